"""Grammar-constrained decoding (host side): tool calls whose arguments are valid under the tool's JSON schema, and
JSON replies under `response_format`, by construction.

Per request, a `GrammarMatcher` follows the tokens the request generates and gives, before every step, the set of
tokens that keep the output inside the grammar as a packed bitmask (int32 [ceil(V / 32)], bit j of word w allows
token 32 w + j). The engine puts the masks of all constrained rows in one [B, W] array and applies it to the logits
on the device inside the batched decode step (k2jax.chat.bitmask.apply_token_bitmask), so constrained and free
requests share a batch and free rows are left bit-identical.

Grammars (Lark, with special tokens referenced by name when the vocabulary has them, as text otherwise):
- tool_choice "required" (or a named function): `[reasoning] <|tool_calls_section_begin|> CALL+
  <|tool_calls_section_end|>`, CALL = `<|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS
  <|tool_call_end|>` with NAME one of the allowed tools and ARGS a JSON object valid under that tool's
  `parameters`; exactly one call when parallel_tool_calls is false. After the section only a stop token is
  allowed, so the turn ends there.
- response_format json_object / json_schema: `[reasoning] JSON`; with tools and tool_choice "auto" the reply may
  instead be a tool-call section (the union), so "auto" keeps its meaning while the JSON reply is still valid.
- tool_choice "auto" / "none" without a JSON response_format: no grammar (free decoding, parsed afterwards).
Arguments and JSON replies are written as `json.dumps` writes them (", " and ": " separators, no other
whitespace): a fixed layout a model is likely to have seen, and no unbounded whitespace runs.

Reasoning (`thinking`): "none" forbids it (the reply starts with the section / JSON); "optional" allows one
`<think> ... </think>` block first, so a thinking model (K2-Thinking) still reasons before it acts, which is how it
was trained and how Moonshot's vendor verifier runs it; "open" is for prompts that already end with `<think>` (the
reply starts inside the reasoning and must close it). The reasoning text itself is free; `max_reasoning_tokens`
bounds it (llguidance's per-rule token limit: after that many tokens of reasoning only `</think>` is allowed, so a
model that would think on until max_tokens still makes its call). A bound needs `</think>` to be one special token
of the vocabulary (Kimi's is): where it is spelled in several tokens, a cut could land inside the marker. Without a
bound a request should leave max_tokens for the reasoning; "none" is the choice when the budget is tight or the
model does not reason.

Engine choice: llguidance (Microsoft guidance's Rust engine, MIT). Measured here (bench/constrained.py and the
README): wheels for Python 3.11 and 3.12 (one abi3 wheel, 3 MB, no dependencies), a JSON-schema compiler covering
nested objects, arrays, enums, numeric bounds, required fields, $ref, anyOf and patterns (unsupported keywords such
as uniqueItems are reported by name), special tokens in the grammar, tokenizer bridges for tiktoken ranks and HF
tokenizer.json, and a per-token mask computed lazily from a token trie (median 96 us per step at 163,840 tokens
on the 2-core CPU machine; a request's grammar compiles in under 10 ms). xgrammar 0.2.9 requires torch,
transformers and triton (a multi-GB install in the 3.12 environment); outlines-core 0.2.14 compiles a schema into a
regex and a full token-level index up front (7.9 s for the benchmark's nested schema at 163,840 tokens) and has no
notion of special tokens.
"""

from __future__ import annotations

import json
import re
from typing import Mapping, Sequence

import llguidance
import llguidance.numpy
import numpy as np

from k2jax.chat.parser import ARGUMENT_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END, THINK_CLOSE, THINK_OPEN

THINKING_MODES = ("none", "optional", "open")
# Arguments are laid out as json.dumps does by default.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


# ---- request validation -----------------------------------------------------------------------------------------------
def _tool_table(tools) -> dict[str, dict]:
    """{name: parameters schema} of OpenAI tool declarations; ValueError names the bad entry."""
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise ValueError("tools must be a list of {'type': 'function', 'function': {'name', 'parameters'}} dicts")
    table = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise ValueError(f"tools[{i}]: needs {{'type': 'function', 'function': {{'name': ...}}}} with a name of "
                             f"letters, digits, '_', '-' or '.', got {tool!r}")
        if name in table:
            raise ValueError(f"tools[{i}]: the name {name!r} is declared twice")
        schema = fn.get("parameters")
        schema = {"type": "object", "properties": {}} if schema is None else schema
        if not isinstance(schema, dict) or schema.get("type", "object") != "object":
            raise ValueError(f"tools[{i}] ({name}): 'parameters' must be a JSON schema of an object, got {schema!r}")
        table[name] = {"type": "object", **schema}
    return table


def _chosen_tools(table: dict[str, dict], tool_choice) -> dict[str, dict] | None:
    """The tools a constrained call may use, or None when tool_choice leaves decoding free."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if tool_choice == "required":
        if not table:
            raise ValueError("tool_choice='required' needs at least one tool in 'tools'")
        return table
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"tool_choice={tool_choice!r} is invalid: 'none', 'auto', 'required' or "
                         f"{{'type': 'function', 'function': {{'name': ...}}}}")
    if name not in table:
        raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools {sorted(table)}")
    return {name: table[name]}


def _response_schema(response_format) -> dict | None:
    """The JSON schema a reply must follow under response_format (None for text or no response_format)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        return schema
    raise ValueError(f"response_format={response_format!r} is invalid: type must be 'text', 'json_object' or "
                     f"'json_schema'")


def _json_grammar(schema: dict, what: str, lenient: bool) -> str:
    """`%json {...}` of a schema with k2jax's JSON layout; ValueError names `what` when llguidance cannot compile it."""
    options = {**JSON_LAYOUT, "lenient": lenient}
    body = {**schema, "x-guidance": {**schema.get("x-guidance", {}), **options}}
    problem = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(body))
    if problem:
        raise ValueError(f"{what}: the JSON schema cannot be enforced: {problem.strip()} (pass lenient=True to "
                         f"ignore keywords the grammar engine does not implement)")
    return "%json " + json.dumps(body)


# ---- grammars ----------------------------------------------------------------------------------------------------------
def _marker(text: str, special_tokens) -> str:
    """A marker in Lark: the special token itself when the vocabulary has it, else its text."""
    return text if text in special_tokens else json.dumps(text)


def _reasoning_rules(thinking: str, special_tokens, max_tokens: int | None = None) -> tuple[str, list[str]]:
    """(prefix to put before the reply, extra rules) for a thinking mode, the reasoning at most max_tokens tokens."""
    if thinking not in THINKING_MODES:
        raise ValueError(f"thinking={thinking!r} is invalid: one of {THINKING_MODES}")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_reasoning_tokens must be an int >= 0, got {max_tokens!r}")
        if thinking != "none" and THINK_CLOSE not in special_tokens:
            raise ValueError(f"max_reasoning_tokens needs {THINK_CLOSE!r} to be one special token of the vocabulary, "
                             f"and this tokenizer spells it in several")
    if thinking == "none":
        return "", []
    if max_tokens is not None:
        # The limit on a rule wrapping the free text: once it is reached only the closing marker may follow.
        body = f"thought {THINK_CLOSE}" if max_tokens > 0 else THINK_CLOSE
        text = [f"thought[max_tokens={max_tokens}]: REASONING_TEXT", "REASONING_TEXT: /(?s:.*)/"]
        rules = text if max_tokens > 0 else []
        if thinking == "open":
            return "reasoning ", [f"reasoning: {body}"] + rules
        return "reasoning? ", [f"reasoning: {_marker(THINK_OPEN, special_tokens)} {body}"] + rules
    if THINK_CLOSE in special_tokens:
        body = f"REASONING_TEXT {THINK_CLOSE}"
        text = "REASONING_TEXT: /(?s:.*)/"
    else:  # one lexeme: text that ends at the first "</think>" (a greedy text lexeme would swallow the marker)
        body = "REASONING_TEXT"
        text = r"REASONING_TEXT: /(?s:.*)<\/think>/ & ~/(?s:.*)<\/think>(?s:.+)/"
    if thinking == "open":
        return "reasoning ", [f"reasoning: {body}", text]
    return "reasoning? ", [f"reasoning: {_marker(THINK_OPEN, special_tokens)} {body}", text]


def _section_rules(tools: dict[str, dict], parallel: bool, special_tokens, lenient: bool) -> list[str]:
    m = lambda s: _marker(s, special_tokens)  # noqa: E731
    calls = " | ".join(f"call_{i}" for i in range(len(tools)))
    rules = [f"section: {m(SECTION_BEGIN)} call{'+' if parallel else ''} {m(SECTION_END)}", f"call: {calls}",
             "CALL_INDEX: /[0-9]{1,6}/"]
    for i, (name, schema) in enumerate(tools.items()):
        rules.append(f"call_{i}: {m(CALL_BEGIN)} {json.dumps('functions.' + name + ':')} CALL_INDEX "
                     f"{m(ARGUMENT_BEGIN)} args_{i} {m(CALL_END)}")
        rules.append(f"args_{i}: " + _json_grammar(schema, f"tool {name!r}", lenient))
    return rules


def request_grammar(*, tools: Sequence[dict] | None = None, tool_choice=None, response_format=None,
                    parallel_tool_calls: bool = True, thinking: str = "none", max_reasoning_tokens: int | None = None,
                    special_tokens=frozenset(), lenient: bool = False) -> str | None:
    """The Lark grammar an OpenAI chat request's output must follow, or None when decoding stays free.

    tools / tool_choice / response_format / parallel_tool_calls: as in the OpenAI chat API; thinking: "none",
    "optional" or "open" (see the module docstring); max_reasoning_tokens: at most this many tokens of reasoning
    (None: unbounded; needs `</think>` as a special token); special_tokens: names of the vocabulary's special tokens
    (markers that are special tokens are required as such); lenient: ignore JSON-schema keywords the engine does
    not implement instead of refusing the schema. ValueError names whatever is invalid.
    """
    table = _tool_table(tools) if tools else {}
    if tool_choice not in (None, "auto", "none", "required") and not table:
        raise ValueError("tool_choice names a function but 'tools' is empty")
    chosen = _chosen_tools(table, tool_choice)
    schema = _response_schema(response_format)
    if chosen is None and schema is None:
        return None
    prefix, rules = _reasoning_rules(thinking, special_tokens, max_reasoning_tokens)
    if chosen is not None:
        body = "section"
        rules += _section_rules(chosen, parallel_tool_calls, special_tokens, lenient)
    else:
        body = "reply"
        rules.append("reply: " + _json_grammar(schema, "response_format", lenient))
        if table and tool_choice in (None, "auto"):
            body = "(reply | section)"
            rules += _section_rules(table, parallel_tool_calls, special_tokens, lenient)
    return "\n".join([f"start: {prefix}{body}"] + rules) + "\n"


# ---- tokenizer bridge ---------------------------------------------------------------------------------------------------
class _VocabAdapter:
    """The duck-typed tokenizer llguidance.TokenizerWrapper reads: token bytes, special ids and an encoder."""

    def __init__(self, tokens: list[bytes], special_ids: list[int], encode, eos_id, bos_id):
        self.tokens, self.special_token_ids, self._encode = tokens, special_ids, encode
        self.eos_token_id, self.bos_token_id = eos_id, bos_id

    def __call__(self, text):
        return self._encode(text if isinstance(text, str) else text.decode("utf-8", errors="replace"))


def _ll_tokenizer(tokenizer, vocab_size: int, stop_ids: list[int]):
    """llguidance's view of a k2jax tokenizer (ByteTokenizer, KimiTokenizer or HFTokenizer)."""
    kind = type(tokenizer).__name__
    by_id = {i: name for name, i in tokenizer.specials.items() if i < vocab_size}
    if kind == "HFTokenizer":
        # tokenizers' own JSON holds the vocabulary and its byte mapping; llguidance reads it directly.
        return llguidance.LLTokenizer(tokenizer._tok.to_str(), n_vocab=vocab_size, eos_token=stop_ids)
    if kind == "KimiTokenizer":
        # KimiTokenizer keeps its tiktoken Encoding in `_enc`; a public accessor should replace this when the
        # tokenizer module is next changed.
        enc = tokenizer._enc
        tokens = [by_id[i].encode() if i in by_id else enc.decode_single_token_bytes(i)
                  for i in range(min(tokenizer.vocab_size, vocab_size))]
    elif kind == "ByteTokenizer":
        tokens = [by_id[i].encode() if i in by_id else bytes([i - tokenizer.offset])
                  for i in range(min(tokenizer.vocab_size, vocab_size))]
    else:
        raise ValueError(f"constrained decoding supports ByteTokenizer, KimiTokenizer and HFTokenizer, not {kind}")
    # Ids past the tokenizer (the model's padding) become special tokens no grammar names, so never allowed.
    padding = list(range(len(tokens), vocab_size))
    tokens += [f"<|k2jax_padding_{i}|>".encode() for i in padding]
    adapter = _VocabAdapter(tokens, sorted(by_id) + padding, tokenizer.encode,
                            stop_ids[0] if stop_ids else tokenizer.eos_id, tokenizer.bos_id)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(adapter), n_vocab=vocab_size, eos_token=stop_ids)


class GrammarTokenizer:
    """A tokenizer prepared for constrained decoding (build once per model: about a second at 163,840 tokens).

    tokenizer: a k2jax tokenizer; vocab_size: the model's logits width (ids past the tokenizer are never allowed;
    the tokenizer may be wider only by special tokens); stop_token_ids: the ids that end a turn (the engine's EOS set), the only ones allowed once a grammar is
    complete.
    """

    def __init__(self, tokenizer, vocab_size: int | None = None, stop_token_ids: Sequence[int] | None = None):
        vocab_size = tokenizer.vocab_size if vocab_size is None else int(vocab_size)
        # Kimi's tokenizer names 258 special ids after its BPE ranks while the model has 256 of them: ids the
        # model cannot produce may only be unused special tokens.
        special_ids = set(tokenizer.specials.values())
        if any(i not in special_ids for i in range(vocab_size, tokenizer.vocab_size)):
            raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} and "
                             f"cuts off ordinary tokens")
        stops = [int(t) for t in (stop_token_ids if stop_token_ids is not None else [tokenizer.eos_id])
                 if t is not None]
        if not stops or any(not 0 <= t < vocab_size for t in stops):
            raise ValueError(f"stop_token_ids={stop_token_ids!r} must be non-empty ids in [0, {vocab_size})")
        self.vocab_size, self.stop_token_ids = vocab_size, stops
        self.words = (vocab_size + 31) // 32
        self.special_tokens = frozenset(tokenizer.specials)
        self.ll = _ll_tokenizer(tokenizer, vocab_size, stops)
        if self.ll.vocab_size != vocab_size:  # the masks must be exactly W words wide
            raise ValueError(f"the grammar engine sees {self.ll.vocab_size} tokens, the model {vocab_size}")

    def grammar(self, **request) -> str | None:
        """request_grammar(...) with this vocabulary's special tokens."""
        return request_grammar(special_tokens=self.special_tokens, **request)

    def matcher(self, grammar: str) -> "GrammarMatcher":
        """A fresh GrammarMatcher for a grammar from `grammar()` / `request_grammar()`; ValueError if invalid."""
        problem = llguidance.LLMatcher.validate_grammar(grammar, self.ll)
        if problem and not problem.startswith("WARNING"):
            raise ValueError(f"invalid grammar: {problem.strip()}")
        return GrammarMatcher(self, grammar)


class GrammarMatcher:
    """One request's position in its grammar. Per decode step: `allowed_tokens_bitmask()` before sampling, then
    `accept(token)` with the sampled token; `is_terminated()` once a stop token ended the grammar."""

    def __init__(self, grammar_tokenizer: GrammarTokenizer, grammar: str):
        self.gt = grammar_tokenizer
        self.ll = llguidance.LLMatcher(grammar_tokenizer.ll, grammar, log_level=0)
        self.num_accepted, self.ended = 0, False
        if self.ll.is_error():
            raise ValueError(f"invalid grammar: {self.ll.get_error()}")

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a token outside the mask was accepted), or None."""
        return self.ll.get_error() if self.ll.is_error() else None

    def allowed_tokens_bitmask(self, out: np.ndarray | None = None) -> np.ndarray:
        """Packed mask of the tokens allowed next: int32 [ceil(V / 32)], bit j of word w allows token 32 w + j.
        out: a C-contiguous int32 [W] array (e.g. a row of the batch mask) to fill instead of a new one."""
        if out is None:
            out = np.empty(self.gt.words, np.int32)
        if out.shape != (self.gt.words,) or out.dtype != np.int32 or not out.flags["C_CONTIGUOUS"]:
            raise ValueError(f"out must be a C-contiguous int32 [{self.gt.words}] array, got {out.dtype} {out.shape}")
        self.ll.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        return out

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False (and `error` set) if the grammar does not allow it."""
        ok = self.ll.consume_token(int(token_id))
        self.num_accepted += ok
        self.ended = self.ended or (ok and int(token_id) in self.gt.stop_token_ids)
        return ok

    def is_accepting(self) -> bool:
        """Whether the output so far is a complete sentence of the grammar (a stop token may come next)."""
        return self.ll.is_accepting()

    def is_terminated(self) -> bool:
        """Whether the request's output is over: a stop token was accepted, or the matcher failed."""
        return self.ended or self.ll.is_error()


class BatchBitmask:
    """The [num_rows, W] int32 mask buffer of a decode batch and its `active` rows, refilled every step.

    fill({row: matcher}) computes the masks of the constrained rows; all other rows are inactive and keep the
    all-ones mask. Returns (bitmask, active) ready for apply_token_bitmask(logits, bitmask, active).
    num_threads: 0 (default) computes the rows one after another in the calling thread; None or n > 0 hands them to
    llguidance's thread pool (its default size, or n threads). On the 2-core development machine the calling
    thread was faster at every size measured (bench/constrained.py: 8 rows 0.08 vs 0.18 ms at V = 264, 0.18 vs
    5.6 ms at V = 163,840; 32 rows 1.0 vs 17 ms), the pool's hand-off costing more than the masks, which llguidance
    mostly serves from its caches; the pool is for many rows of expensive masks on a machine with idle cores.
    """

    def __init__(self, num_rows: int, vocab_size: int, num_threads: int | None = 0):
        if num_threads is not None and num_threads < 0:
            raise ValueError(f"num_threads={num_threads} is invalid: 0 (the calling thread), None or a positive count")
        self.words = (vocab_size + 31) // 32
        self.bitmask = np.full((num_rows, self.words), -1, np.int32)
        self.active = np.zeros(num_rows, bool)
        self.executor = llguidance.LLExecutor(num_threads) if num_threads != 0 else None

    def fill(self, matchers: Mapping[int, GrammarMatcher]) -> tuple[np.ndarray, np.ndarray]:
        self.active[:] = False
        self.bitmask[:] = -1
        if matchers:
            for row, m in matchers.items():
                if m.gt.words != self.words:
                    raise ValueError(f"row {row}: matcher mask width {m.gt.words} != batch mask width {self.words}")
                self.active[row] = True
            if self.executor is None:
                for row, m in matchers.items():
                    m.allowed_tokens_bitmask(out=self.bitmask[row])
            else:
                llguidance.numpy.fill_next_token_bitmask_par(self.executor, [(m.ll, r) for r, m in matchers.items()],
                                                             self.bitmask)
        return self.bitmask, self.active


def unpack_bitmask(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """bool [..., V] of a packed int32 [..., W] mask (host-side reference of apply_token_bitmask's unpacking)."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=-1, bitorder="little")
    return bits[..., :vocab_size].astype(bool)
