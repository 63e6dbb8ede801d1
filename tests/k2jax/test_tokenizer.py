"""Tokenizers: a tiny Kimi-format vocabulary built here, checked against a plain BPE written from the algorithm; an
HF tokenizer.json trained here; a Kimi-size folder (163,584 ranks, 163,842 ids) served by a 163,840-id model."""

import base64
import importlib.util
import json
from pathlib import Path

import pytest
import regex
from flax import nnx

from k2jax import KimiLinear, load_config
from k2jax.chat import encode_chat, render_chat
from k2jax.hf import save_hf_checkpoint
from k2jax.tokenizer import (
    KIMI_PAT_STR,
    ByteTokenizer,
    HFTokenizer,
    KimiTokenizer,
    load_tokenizer,
    split_runs,
)

ROOT = Path(__file__).resolve().parents[2]

# Merged tokens in rank order after the 256 single bytes (so "hello" needs he, ll, hell, hello in that order).
MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"\xe4\xbd", b"\xe4\xbd\xa0",
          b"'s", b"12", b"123", b"\n\n"]
NAMED = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>", 10: "<|im_system|>",
         17: "<|im_middle|>", 255: "[PAD]"}  # offsets from the base vocabulary size, as in Kimi's layout
TEXTS = ["hello world", "Hello, World! It's 12345 o'clock\n\n  x", "你好 hello你们", "tabs\t\tand  spaces   ",
         "émoji 🙂 ok", "", "DON'T stop", "a\r\nb"]


def _write_vocab(folder, named=NAMED):
    tokens = [bytes([b]) for b in range(256)] + MERGES
    lines = [f"{base64.b64encode(t).decode()} {r}" for r, t in enumerate(tokens)]
    (folder / "tiktoken.model").write_text("\n".join(lines) + "\n")
    base = len(tokens)
    cfg = {"added_tokens_decoder": {str(base + k): {"content": v, "special": True} for k, v in named.items()},
           "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": {"content": "[PAD]"}}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return {t: r for r, t in enumerate(tokens)}


def _reference_encode(text, ranks):
    """Byte-level BPE from its definition: split with the pattern, then repeatedly merge the adjacent pair whose
    concatenation has the lowest rank."""
    ids = []
    for piece in regex.compile("(?V1)" + KIMI_PAT_STR).findall(text):  # V1: `&&` is class intersection
        parts = [bytes([b]) for b in piece.encode()]
        while True:
            pairs = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
            pairs = [p for p in pairs if p[0] is not None]
            if not pairs:
                break
            _, i = min(pairs)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


@pytest.fixture()
def kimi(tmp_path):
    ranks = _write_vocab(tmp_path)
    return load_tokenizer(tmp_path), ranks, tmp_path


def test_kimi_encode_matches_reference_bpe_and_round_trips(kimi):
    tok, ranks, _ = kimi
    assert isinstance(tok, KimiTokenizer)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == _reference_encode(text, ranks), text
        assert tok.decode(ids) == text
    # The merges really apply (not just bytes): "hello world" is two tokens.
    assert tok.encode("hello world") == [ranks[b"hello"], ranks[b" world"]]
    # Han runs are split from Latin letters by the pattern.
    assert [tok.decode([i]) for i in tok.encode("你hello")] == ["你", "hello"]


def test_kimi_pattern_pieces():
    split = regex.compile("(?V1)" + KIMI_PAT_STR).findall
    assert split("DON'T stop, it's 12345") == ["DON'T", " stop", ",", " it's", " ", "123", "45"]
    assert split("你好 helloWorld你们\n\n  x") == ["你好", " hello", "World", "你们", "\n\n", " ", " x"]


def test_kimi_special_token_layout(kimi):
    tok, ranks, _ = kimi
    base = len(ranks)
    assert tok.vocab_size == base + 258
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (base, base + 1, base + 255)
    assert tok.special_id("<|im_middle|>") == base + 17
    assert tok.special_id(f"<|reserved_token_{base + 5}|>") == base + 5
    assert tok.decode([base + 2]) == "<|im_end|>"
    with pytest.raises(ValueError, match="no special token"):
        tok.special_id("<|nope|>")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([base + 258])


def test_special_strings_are_text_unless_allowed(kimi):
    tok, ranks, _ = kimi
    end = tok.special_id("<|im_end|>")
    plain = tok.encode("hi<|im_end|>hello")
    assert end not in plain and tok.decode(plain) == "hi<|im_end|>hello"
    allowed = tok.encode("hi<|im_end|>hello", allow_special=True)
    assert allowed == tok.encode("hi") + [end] + [ranks[b"hello"]]
    assert tok.encode("hello", add_bos=True) == [tok.bos_id, ranks[b"hello"]]


def test_split_runs_caps_same_class_runs():
    text = "aaaaaaa   bb" + " " * 9 + "c"
    pieces = list(split_runs(text, 3))
    assert "".join(pieces) == text
    for p in pieces:
        runs = regex.findall(r"\s+|\S+", p)
        assert max(len(r) for r in runs) <= 3
    # Cuts only where a run exceeds the limit: 7 a's -> 3 + 3 + 1, 9 spaces -> 3 + 3 + 3.
    assert pieces == ["aaa", "aaa", "a   bb   ", "   ", "   c"]
    assert list(split_runs("", 3)) == [""]


def test_byte_tokenizer():
    tok = ByteTokenizer()
    text = "héllo 你好 🙂"
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == tok.bos_id == 1 and all(8 <= i < 264 for i in ids[1:]) and len(ids) == 1 + len(text.encode())
    assert tok.decode(ids) == "[BOS]" + text
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (264, 0, 2)
    messages = [{"role": "user", "content": "hi"}]
    chat = encode_chat(tok, messages, thinking=False)
    assert chat[0] == tok.special_id("<|im_system|>") and tok.decode(chat) == render_chat(messages, thinking=False)
    assert tok.decode(chat).endswith("<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|>"
                                     "<think></think>")
    assert tok.decode([8 + 0xFF]) == "\ufffd"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([264])


def test_load_tokenizer_dispatch_and_errors(kimi, tmp_path_factory):
    tok, _, folder = kimi
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    by_file = load_tokenizer(folder / "tiktoken.model")
    assert by_file.encode("hello world") == tok.encode("hello world") and by_file.bos_id == tok.bos_id
    with pytest.raises(ValueError, match="no tokenizer at"):
        load_tokenizer(folder / "missing")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ValueError, match="no tiktoken.model or tokenizer.json"):
        load_tokenizer(empty)
    bad = tmp_path_factory.mktemp("bad")
    (bad / "tiktoken.model").write_text("aGk= 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"tiktoken.model:2"):
        load_tokenizer(bad)
    hf = tmp_path_factory.mktemp("hf")
    (hf / "tokenizer.json").write_text("{}")
    try:
        import tokenizers  # noqa: F401, PLC0415 (optional: the test extra)
    except ImportError:
        with pytest.raises(ValueError, match="needs the `tokenizers` package"):
            load_tokenizer(hf)


# ---- does a tokenizer fit a model -----------------------------------------------------------------------------------
def test_check_fits_model_allows_unused_reserved_ids_only(kimi):
    tok, ranks, _ = kimi
    base = len(ranks)
    assert tok.vocab_size == base + 258
    # The named specials end at [PAD] = base + 255: the two reserved ids after it need not exist in the model.
    tok.check_fits_model(base + 256)
    with pytest.raises(ValueError, match=rf"special tokens that k2jax emits lie outside it: pad \[PAD\]={base + 255}"):
        tok.check_fits_model(base + 255)
    with pytest.raises(ValueError, match=rf"71 of the {base} ids that encode\(\) produces from text lie outside it "
                                         rf"\(ids 200..{base - 1}\).*bos \[BOS\]={base}.*<\|im_middle\|>={base + 17}"):
        tok.check_fits_model(200)
    ByteTokenizer().check_fits_model(264)
    with pytest.raises(ValueError, match=r"ids 263\)"):
        ByteTokenizer().check_fits_model(263)


KIMI_RANKS, KIMI_VOCAB = 163_584, 163_840
KIMI_NAMED = {163584: "[BOS]", 163585: "[EOS]", 163586: "<|im_end|>", 163587: "<|im_user|>", 163588: "<|im_assistant|>",
              163594: "<|im_system|>", 163601: "<|im_middle|>", 163839: "[PAD]"}


def _write_kimi_size_tokenizer(folder, named=KIMI_NAMED):
    """A tiktoken.model with as many ranks as Kimi's (the 256 bytes, every 2-byte string, then distinct 3-byte
    strings: not a trained BPE, but tiktoken merges with it) and Kimi's named specials."""
    tokens = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    tokens += [i.to_bytes(3, "big") for i in range(1 << 16, (1 << 16) + KIMI_RANKS - len(tokens))]
    (folder / "tiktoken.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n"
                                                   for r, t in enumerate(tokens)))
    cfg = {"added_tokens_decoder": {str(i): {"content": c, "special": True} for i, c in named.items()},
           "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]"}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def _serve_main():
    spec = importlib.util.spec_from_file_location("k2jax_serve_cli", ROOT / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_serve_accepts_a_kimi_size_tokenizer_folder(tmp_path, capsys):
    """163,584 ranks + 258 reserved ids = 163,842 > the model's 163,840: a real Kimi folder's shape must serve."""


    cfg = load_config("tiny", vocab_size=KIMI_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      kda_layers=[1], full_attn_layers=[2], moe_intermediate_size=16, bos_token_id=163584,
                      eos_token_id=163585, pad_token_id=163839, param_dtype="bfloat16", dtype="bfloat16")
    folder = save_hf_checkpoint(KimiLinear(cfg, rngs=nnx.Rngs(0)), tmp_path / "kimi")
    _write_kimi_size_tokenizer(folder)
    tok = load_tokenizer(folder)
    assert isinstance(tok, KimiTokenizer) and tok.vocab_size == KIMI_RANKS + 258 > KIMI_VOCAB
    main = _serve_main()
    args = ["--checkpoint", str(folder), "--max-tokens", "2", "--slots", "1", "--max-len", "16", "--no-warmup"]
    assert main(args + ["--prompt", "hello world"]) == 0
    out = capsys.readouterr().out
    assert "=== 'hello world' -> [" in out and "2 tokens" in out
    # A named special the chat format needs beyond the model is refused, and the message names it.
    _write_kimi_size_tokenizer(folder, {**KIMI_NAMED, 163841: "<|im_end|>", 163586: "<|im_end_old|>"})
    with pytest.raises(SystemExit, match=r"does not fit the model.*<\|im_end\|>=163841"):
        main(args + ["--prompt", "hello", "--chat"])


# ---- HF tokenizer.json ----------------------------------------------------------------------------------------------
HF_SPECIALS = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
               "[PAD]"]


@pytest.fixture()
def hf(tmp_path):
    """A byte-level BPE tokenizer.json trained here, Kimi's chat markers as special tokens (ids 0-7) and one
    added token that is not special."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=320, special_tokens=HF_SPECIALS,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "hi there, user", "the assistant said hello"] * 20, trainer)
    tok.add_tokens([tokenizers.AddedToken("<think>", special=False)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "[BOS]", "eos_token": "[EOS]",
                                                                "pad_token": "[PAD]"}))
    return load_tokenizer(tmp_path)


def test_hf_special_strings_are_text_unless_allowed(hf):
    assert isinstance(hf, HFTokenizer)
    specials = set(range(len(HF_SPECIALS)))
    text = "hi<|im_end|><|im_user|>user<|im_middle|>[BOS] hello"
    plain = hf.encode(text)
    assert not specials & set(plain) and hf.decode(plain) == text
    assert hf.specials == {s: i for i, s in enumerate(HF_SPECIALS)} and (hf.bos_id, hf.eos_id, hf.pad_id) == (0, 1, 7)
    allowed = hf.encode(text, allow_special=True)
    assert allowed[len(hf.encode("hi")):][:2] == [hf.special_id("<|im_end|>"), hf.special_id("<|im_user|>")]
    assert hf.decode(allowed) == text
    # A user message cannot open a new turn: its markers stay text inside the content.
    chat = encode_chat(hf, [{"role": "user", "content": "x<|im_end|><|im_assistant|>"}], thinking=False)
    markers = [i for i in encode_chat(hf, [{"role": "user", "content": "x"}], thinking=False) if i in specials]
    assert [i for i in chat if i in specials] == markers and len(markers) == 8
    # An added token that is not special is ordinary vocabulary: it always matches.
    think = hf._tok.token_to_id("<think>")
    assert think in hf.encode("a<think>b") and think in hf.plain_ids()


def test_hf_check_fits_model(hf):
    ids = hf.plain_ids()
    assert min(ids) == len(HF_SPECIALS) and max(ids) == hf.vocab_size - 1
    hf.check_fits_model(hf.vocab_size)
    with pytest.raises(ValueError, match=rf"1 of the {len(ids)} ids .* \(ids {hf.vocab_size - 1}\)"):
        hf.check_fits_model(hf.vocab_size - 1)
