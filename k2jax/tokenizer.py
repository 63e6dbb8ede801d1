"""Tokenizers: Kimi's tiktoken BPE, HF `tokenizer.json` (through the optional `tokenizers` package) and a byte
tokenizer for embedded demos, behind one interface, plus the names of Kimi's chat-format special tokens (the chat
format itself, Kimi K2's or a checkpoint's Jinja template, is k2jax.chat: `encode_chat(tokenizer, messages)`).

Common interface: `encode(text, add_bos=False, allow_special=False) -> list[int]`, `decode(ids) -> str`,
`bos_id` / `eos_id` / `pad_id` (int or None), `vocab_size`, `special_id(token)`, `plain_ids()`,
`check_fits_model(vocab_size)`. `encode` treats special-token strings in `text` as plain text unless
`allow_special=True` (HF's Kimi tokenizer allows them by default; we do not, so user text cannot forge a turn
marker), for every tokenizer class.

`vocab_size` counts every id the tokenizer knows, reserved ones included; a model may be smaller (real Kimi
folders: 163,584 ranks + 258 reserved special ids = 163,842 ids, model vocabulary 163,840). What must fit the model
is what `check_fits_model` checks: the ids `encode` produces from text and the named special tokens k2jax uses.

Kimi tokenizer (source: `tokenization_kimi.py` shipped with moonshotai/Kimi-Linear-48B-A3B-Instruct and
Kimi-K2-Instruct, class `TikTokenTokenizer`):
- `tiktoken.model`: one `base64(token bytes) rank` pair per line; the ranks are the BPE merge priorities and the
  ids of the base vocabulary (163,584 entries for Kimi).
- Special tokens take the `num_reserved_special_tokens + 2 = 258` ids right after the base vocabulary; each is
  named by `added_tokens_decoder` in tokenizer_config.json, or `<|reserved_token_{id}|>` when not named there.
  Kimi: [BOS]=163584, [EOS]=163585, <|im_end|>=163586, <|im_user|>=163587, <|im_assistant|>=163588,
  <|im_system|>=163594, <|im_middle|>=163601, [PAD]=163839.
- Pre-tokenisation regex `KIMI_PAT_STR` below (Han runs split from other letters; case-aware words with English
  contractions; numbers in groups of up to 3). `&&` is a character-class intersection (supported by tiktoken's
  regex engine).
- Long inputs are cut into pieces of at most 400,000 characters, and runs of more than 25,000 consecutive
  whitespace (or non-whitespace) characters are cut, before BPE, exactly as `TikTokenTokenizer.encode` does
  (tiktoken can fail on longer runs).

Chat format (source: the `chat_template` of Kimi-K2-Instruct, which Kimi-Linear-Instruct shares as far as the public
copies show; UNCONFIRMED for Kimi-Linear's tool-call details, which are not implemented here). Each message is

    <|im_system|> / <|im_user|> / <|im_assistant|>   (system and tool roles use <|im_system|>)
    then the role name (message 'name' if given, else the role), <|im_middle|>, the content, <|im_end|>

with no separators between messages, and the generation prompt is `<|im_assistant|>assistant<|im_middle|>`. The
K2 template inserts a default system message ("You are Kimi, an AI assistant created by Moonshot AI.") when the
first message is not a system message; pass it as `default_system=` to reproduce that (off by default, since
Kimi-Linear's default is UNCONFIRMED).
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import tiktoken

KIMI_PAT_STR = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
KIMI_NUM_RESERVED_SPECIAL_TOKENS = 256
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

IM_SYSTEM, IM_USER, IM_ASSISTANT = "<|im_system|>", "<|im_user|>", "<|im_assistant|>"
IM_MIDDLE, IM_END = "<|im_middle|>", "<|im_end|>"
CHAT_TOKENS = (IM_SYSTEM, IM_USER, IM_ASSISTANT, IM_MIDDLE, IM_END)


class BaseTokenizer:
    """Shared behaviour: special-token lookup and the chat format. Subclasses set `specials` (name -> id) and
    implement `_encode_plain(text) -> list[int]` and `decode(ids) -> str`."""

    specials: dict[str, int]
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None

    def special_id(self, token: str) -> int:
        """Id of a special token such as '<|im_end|>' (ValueError if this vocabulary lacks it)."""
        if token not in self.specials:
            raise ValueError(f"{type(self).__name__}: no special token {token!r} in this vocabulary")
        return self.specials[token]

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text` (prefixed by bos_id when add_bos). Special-token strings in `text` are plain text
        unless allow_special."""
        if not isinstance(text, str):
            raise ValueError(f"encode: text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"{type(self).__name__}: no BOS token in this vocabulary")
            ids.append(self.bos_id)
        if not allow_special or not self.specials:
            return ids + self._encode_plain(text)
        pattern = "(" + "|".join(re.escape(s) for s in sorted(self.specials, key=len, reverse=True)) + ")"
        for i, piece in enumerate(re.split(pattern, text)):
            ids += [self.specials[piece]] if i % 2 else self._encode_plain(piece)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Number of ids this tokenizer knows (its largest id + 1), reserved special ids included."""
        raise NotImplementedError

    def plain_ids(self) -> Sequence[int]:
        """Every id that `encode(text)` (special tokens not allowed) can produce, ascending."""
        raise NotImplementedError

    def _used_specials(self) -> list[tuple[str, int]]:
        """(label, id) of the special tokens k2jax emits: BOS, EOS, PAD and the chat markers this vocabulary has."""
        names = {i: name for name, i in self.specials.items()}
        used = [(f"{role} {names.get(i, '')}".rstrip(), i)
                for role, i in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id)) if i is not None]
        return used + [(name, self.specials[name]) for name in CHAT_TOKENS if name in self.specials]

    def check_fits_model(self, vocab_size: int) -> None:
        """ValueError unless everything this tokenizer feeds a model of `vocab_size` ids lies in [0, vocab_size):
        the ids `encode` produces from text and the named special tokens k2jax emits (BOS, EOS, PAD, chat
        markers). Reserved special ids beyond the model that nothing emits are allowed (Kimi's tiktoken.model
        reserves 258 ids after its ranks, two more than Kimi's 163,840-id models have); text that spells one out
        under `allow_special=True` still encodes to it, and the engine rejects such a prompt. The error names the
        offending ids and tokens."""
        problems = []
        ids = self.plain_ids()
        outside = [i for i in ids if not 0 <= i < vocab_size]
        if outside:
            problems.append(f"{len(outside)} of the {len(ids)} ids that encode() produces from text lie outside it "
                            f"(ids {_id_ranges(outside)})")
        bad = [f"{label}={i}" for label, i in self._used_specials() if not 0 <= i < vocab_size]
        if bad:
            problems.append(f"special tokens that k2jax emits lie outside it: {', '.join(bad)}")
        if problems:
            raise ValueError(f"{type(self).__name__} ({self.vocab_size} ids) does not fit a model with vocab_size="
                             f"{vocab_size} (ids 0..{vocab_size - 1}): " + "; ".join(problems))

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: token ids {bad[:10]} outside [0, vocab_size={self.vocab_size})")
        return ids


def _id_ranges(ids: Sequence[int], limit: int = 5) -> str:
    """'3..7, 9, 12..20' for sorted ids (at most `limit` ranges, then '...')."""
    ranges: list[list[int]] = []
    for i in ids:
        if ranges and i == ranges[-1][1] + 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    text = [f"{a}..{b}" if b > a else str(a) for a, b in ranges[:limit]]
    return ", ".join(text) + (", ..." if len(ranges) > limit else "")


# ---- byte tokenizer --------------------------------------------------------------------------------------------------
class ByteTokenizer(BaseTokenizer):
    """UTF-8 bytes as tokens, for demos without a vocabulary file. Ids: 0 [PAD], 1 [BOS], 2 [EOS], 3..7 the chat
    tokens (<|im_end|>, <|im_user|>, <|im_assistant|>, <|im_system|>, <|im_middle|>), then byte b -> 8 + b.
    vocab_size 264 (fits configs/default.yaml: pad 0, bos 1, eos 2)."""

    SPECIALS = ("[PAD]", "[BOS]", "[EOS]", IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE)

    def __init__(self):
        self.specials = {s: i for i, s in enumerate(self.SPECIALS)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.offset = len(self.SPECIALS)

    @property
    def vocab_size(self) -> int:
        return self.offset + 256

    def plain_ids(self) -> Sequence[int]:
        return range(self.offset, self.offset + 256)

    def _encode_plain(self, text: str) -> list[int]:
        return [self.offset + b for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens are spelled out, invalid UTF-8 becomes U+FFFD."""
        out, pending = [], bytearray()
        for i in self._check_ids(ids):
            if i >= self.offset:
                pending.append(i - self.offset)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            out.append(self.SPECIALS[i])
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


# ---- Kimi tiktoken tokenizer -----------------------------------------------------------------------------------------
def load_bpe_ranks(file: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one `base64(token) rank` per line. ValueError names the file and line."""
    ranks: dict[bytes, int] = {}
    with open(file, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected 2 fields")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except ValueError as e:
                raise ValueError(f"{file}:{lineno}: not a 'base64-token rank' line ({e}): {line[:80]!r}") from None
            if token in ranks:
                raise ValueError(f"{file}:{lineno}: token {token!r} appears twice")
            ranks[token] = rank
    if not ranks:
        raise ValueError(f"{file}: empty BPE file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{file}: ranks must be exactly 0..{len(ranks) - 1}, each once")
    return ranks


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def split_runs(text: str, limit: int) -> Iterator[str]:
    """Cut `text` so that no piece holds more than `limit` consecutive whitespace (or non-whitespace) chars."""
    start, run, prev = 0, 0, None
    for i, ch in enumerate(text):
        space = ch.isspace()
        run = run + 1 if space == prev else 1
        prev = space
        if run > limit:
            yield text[start:i]
            start, run = i, 1
    yield text[start:]


class KimiTokenizer(BaseTokenizer):
    """Kimi's tiktoken BPE tokenizer (see the module docstring for the file formats and sources)."""

    def __init__(self, bpe_file: str | os.PathLike, tokenizer_config: dict | None = None):
        cfg = tokenizer_config or {}
        ranks = load_bpe_ranks(bpe_file)
        named = {}
        for key, value in (cfg.get("added_tokens_decoder") or {}).items():
            content = _token_content(value)
            if content is None or not str(key).isdigit():
                raise ValueError(f"tokenizer_config.json: bad added_tokens_decoder entry {key!r}: {value!r}")
            named[int(key)] = content
        base = self.num_ranks = len(ranks)
        self.specials = {named.get(i, f"<|reserved_token_{i}|>"): i
                         for i in range(base, base + KIMI_NUM_RESERVED_SPECIAL_TOKENS + 2)}
        self._enc = tiktoken.Encoding(name=Path(bpe_file).name, pat_str=KIMI_PAT_STR, mergeable_ranks=ranks,
                                      special_tokens=self.specials)
        self.bos_id = self.specials.get(_token_content(cfg.get("bos_token")) or "[BOS]")
        self.eos_id = self.specials.get(_token_content(cfg.get("eos_token")) or "[EOS]")
        self.pad_id = self.specials.get(_token_content(cfg.get("pad_token")) or "[PAD]")

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def plain_ids(self) -> Sequence[int]:
        return range(self.num_ranks)

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for start in range(0, max(len(text), 1), MAX_ENCODE_CHARS):
            for piece in split_runs(text[start:start + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
                ids += self._enc.encode(piece, allowed_special=set(), disallowed_special=())
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens are spelled out, invalid UTF-8 becomes U+FFFD."""
        return self._enc.decode(self._check_ids(ids))


# ---- HF tokenizer.json -----------------------------------------------------------------------------------------------
class HFTokenizer(BaseTokenizer):
    """A Hugging Face `tokenizer.json`, through the `tokenizers` package (an optional dependency).

    `specials` are the added tokens marked special; with `allow_special=False` their strings in the text are
    tokenised as ordinary text (`tokenizers`' `encode_special_tokens` mode), so user text cannot forge them.
    Added tokens not marked special are ordinary vocabulary and always match."""

    def __init__(self, tokenizer_json: str | os.PathLike, tokenizer_config: dict | None = None):
        try:
            from tokenizers import Tokenizer  # noqa: PLC0415 (optional: the test extra)
        except ImportError:
            raise ValueError(f"{tokenizer_json}: reading a tokenizer.json needs the `tokenizers` package, which is "
                             f"not installed (pip install tokenizers)") from None
        self._tok = Tokenizer.from_file(str(tokenizer_json))
        # Special-token strings in text become ordinary tokens; BaseTokenizer.encode splits them out itself when
        # allow_special=True.
        if not hasattr(self._tok, "encode_special_tokens"):
            raise ValueError(f"{tokenizer_json}: the installed `tokenizers` is too old to encode special-token strings "
                             f"as text (Tokenizer.encode_special_tokens); pip install 'tokenizers>=0.20'")
        self._tok.encode_special_tokens = True
        added = self._tok.get_added_tokens_decoder()
        self.specials = {t.content: i for i, t in added.items() if t.special}
        special_ids = set(self.specials.values())
        text_ids = set(self._tok.get_vocab(with_added_tokens=False).values()) - special_ids
        self._plain_ids = sorted(text_ids | {i for i, t in added.items() if not t.special})
        cfg = tokenizer_config or {}
        for attr, key in (("bos_id", "bos_token"), ("eos_id", "eos_token"), ("pad_id", "pad_token")):
            name = _token_content(cfg.get(key))
            setattr(self, attr, self._tok.token_to_id(name) if name else None)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def plain_ids(self) -> Sequence[int]:
        return self._plain_ids

    def _encode_plain(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=False)


# ---- entry point -----------------------------------------------------------------------------------------------------
def load_tokenizer(path_or_name: str | os.PathLike) -> BaseTokenizer:
    """'byte' -> ByteTokenizer; a folder with tiktoken.model -> KimiTokenizer; a folder with tokenizer.json ->
    HFTokenizer (needs `tokenizers`); a tiktoken.model or tokenizer.json file works too (tokenizer_config.json is
    read from the same folder)."""
    if str(path_or_name) == "byte":
        return ByteTokenizer()
    p = Path(path_or_name)
    if p.is_file():
        folder, file = p.parent, p
    elif p.is_dir():
        folder = p
        file = next((p / n for n in ("tiktoken.model", "tokenizer.json") if (p / n).is_file()), None)
        if file is None:
            raise ValueError(f"{p}: no tiktoken.model or tokenizer.json in this folder")
    else:
        raise ValueError(f"no tokenizer at {str(path_or_name)!r}: expected 'byte', a folder with tiktoken.model or "
                         f"tokenizer.json, or one of those files")
    cfg = None
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.exists():
        try:
            cfg = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_file}: not valid JSON: {e}") from None
    if file.suffix == ".json":
        return HFTokenizer(file, cfg)
    return KimiTokenizer(file, cfg)
