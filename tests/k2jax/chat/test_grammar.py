"""k2jax.chat.grammar and k2jax.chat.bitmask: constrained decoding makes tool calls and JSON replies valid by
construction; the device mask leaves free rows untouched."""

import json

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from k2jax.chat import parse_assistant
from k2jax.chat.bitmask import apply_token_bitmask
from k2jax.chat.grammar import BatchBitmask, GrammarTokenizer, request_grammar, unpack_bitmask
from k2jax.tokenizer import ByteTokenizer
from tests.k2jax.chat.chat_fixtures import FLIGHT_SCHEMA, TOOLS, synthetic_kimi_tokenizer

SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {"byte": ByteTokenizer(), "kimi": synthetic_kimi_tokenizer(tmp_path_factory.mktemp("kimi_vocab"))}


def _grammar_tokenizer(tok, vocab_pad=0):
    # The model's vocabulary may be wider than the tokenizer's (padding ids, never allowed under a grammar).
    return GrammarTokenizer(tok, tok.vocab_size + vocab_pad, [tok.special_id("<|im_end|>"), tok.eos_id])


def _decode_batch(gt, tok, requests, rng, max_steps=3000):
    """Simulated batched decoding with random logits: requests is a list of (grammar or None); constrained rows use
    the grammar masks through apply_token_bitmask, free rows sample the raw logits. Returns per-row token lists and
    the per-step (logits, masked) pairs of the free rows for the bit-identity check."""
    V = gt.vocab_size
    B = len(requests)
    matchers = {r: gt.matcher(g) for r, g in enumerate(requests) if g is not None}
    batch = BatchBitmask(B, V)
    apply = jax.jit(apply_token_bitmask)
    outputs = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    free_checks = []
    for _ in range(max_steps):
        live = {r: m for r, m in matchers.items() if not done[r]}
        bitmask, active = batch.fill(live)
        logits = rng.standard_normal((B, V)).astype(np.float32)
        masked = np.asarray(apply(jnp.asarray(logits), jnp.asarray(bitmask), jnp.asarray(active)))
        free_checks.append((logits[~active], masked[~active]))
        tokens = masked.argmax(-1)
        for r in range(B):
            if done[r]:
                continue
            t = int(tokens[r])
            outputs[r].append(t)
            if r in matchers:
                assert matchers[r].accept(t), matchers[r].error
                done[r] = matchers[r].is_terminated()
            else:
                done[r] = t in gt.stop_token_ids or len(outputs[r]) >= 40
        if done.all():
            break
    assert done.all(), "a constrained generation did not finish"
    return outputs, free_checks


def _check_tool_calls(text, allowed_names, max_calls=None):
    parsed = parse_assistant(text)
    assert parsed["tool_calls"], text
    assert parsed["content"] is None and parsed["reasoning_content"] is None, text
    if max_calls is not None:
        assert len(parsed["tool_calls"]) <= max_calls
    for call in parsed["tool_calls"]:
        name = call["function"]["name"]
        assert name in allowed_names and call["id"].startswith(f"functions.{name}:")
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])
    return parsed["tool_calls"]


@pytest.mark.parametrize("vocab", ["byte", "kimi"])
def test_fifty_required_tool_calls_parse_and_validate_in_mixed_batches(tokenizers, vocab):
    tok = tokenizers[vocab]
    gt = _grammar_tokenizer(tok, vocab_pad=40)
    required = gt.grammar(tools=TOOLS, tool_choice="required")
    single = gt.grammar(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "search_flights"}},
                        parallel_tool_calls=False)
    rng = np.random.default_rng(0)
    calls, n_constrained = [], 0
    for b in range(5):  # 5 batches of 10 constrained + 6 free rows, interleaved
        requests = [None if r % 8 in (1, 4, 6) else (single if r % 2 else required) for r in range(16)]
        outputs, free_checks = _decode_batch(gt, tok, requests, rng)
        for r, g in enumerate(requests):
            if g is None:
                continue
            n_constrained += 1
            ids = outputs[r]
            assert ids[-1] in gt.stop_token_ids
            names = {"search_flights"} if g is single else set(SCHEMAS)
            calls += _check_tool_calls(tok.decode(ids[:-1]), names, max_calls=1 if g is single else None)
        for raw, masked in free_checks:  # free rows: bit-identical to the logits they had alone
            assert np.array_equal(raw, masked)
    assert n_constrained == 50 and len(calls) >= 50
    assert {c["function"]["name"] for c in calls} == set(SCHEMAS)  # both tools were exercised


def test_free_rows_identical_to_running_alone():
    rng = np.random.default_rng(1)
    V = 1000
    logits = rng.standard_normal((6, V)).astype(np.float32)
    logits[2, 5] = -np.inf  # special values pass through untouched as well
    bitmask = rng.integers(-2**31, 2**31, size=(6, (V + 31) // 32), dtype=np.int64).astype(np.int32)
    active = np.array([True, False, True, False, False, True])
    out = np.asarray(jax.jit(apply_token_bitmask)(jnp.asarray(logits), jnp.asarray(bitmask), jnp.asarray(active)))
    for r in np.flatnonzero(~active):
        alone = np.asarray(apply_token_bitmask(jnp.asarray(logits[r:r + 1]), jnp.asarray(bitmask[r:r + 1]),
                                               jnp.zeros(1, bool)))
        assert np.array_equal(out[r], logits[r]) and np.array_equal(alone[0], logits[r])
    allowed = unpack_bitmask(bitmask, V)
    for r in np.flatnonzero(active):
        np.testing.assert_array_equal(out[r], np.where(allowed[r], logits[r], -np.inf))
    assert allowed[:, 31::32].any() and (bitmask < 0).any()  # bit 31 (the sign bit) was exercised
    with pytest.raises(ValueError, match="need bitmask"):
        apply_token_bitmask(jnp.asarray(logits), jnp.asarray(bitmask[:, :-1]), jnp.asarray(active))


def test_apply_token_bitmask_bf16_and_unpack_order():
    V = 70
    bitmask = np.zeros((1, 3), np.int32)
    bitmask[0, 0] = 1 << 3  # token 3
    bitmask[0, 2] = 1 << 5  # token 69
    logits = jnp.arange(V, dtype=jnp.bfloat16)[None]
    out = apply_token_bitmask(logits, jnp.asarray(bitmask), jnp.ones(1, bool))
    assert out.dtype == jnp.bfloat16
    assert np.flatnonzero(np.isfinite(np.asarray(out, np.float32)[0])).tolist() == [3, 69]


@pytest.mark.parametrize("vocab", ["byte", "kimi"])
def test_matcher_follows_a_valid_call_and_rejects_a_schema_violation(tokenizers, vocab):
    tok = tokenizers[vocab]
    gt = _grammar_tokenizer(tok)
    grammar = gt.grammar(tools=TOOLS, tool_choice="required", thinking="optional")
    sb, se = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
    head = "<think>Two adults to Rome.</think>" + sb + "<|tool_call_begin|>functions.search_flights:0" \
        "<|tool_call_argument_begin|>"
    good = {"origin": "NYC", "destination": "Rome", "passengers": [{"name": "Ann", "age": 40}], "budget": 900.5}
    ids = tok.encode(head + json.dumps(good) + "<|tool_call_end|>" + se, allow_special=True)
    m = gt.matcher(grammar)
    for t in ids:
        assert m.accept(t), (tok.decode([t]), m.error)
    assert m.is_accepting() and not m.is_terminated()
    allowed = unpack_bitmask(m.allowed_tokens_bitmask(), gt.vocab_size)
    assert set(np.flatnonzero(allowed)) == set(gt.stop_token_ids)  # only a stop token may follow
    assert m.accept(gt.stop_token_ids[0]) and m.is_terminated()
    parsed = parse_assistant(tok.decode(ids))
    assert parsed["reasoning_content"] == "Two adults to Rome."
    assert json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == good

    bad = dict(good, destination="Berlin")  # not in the enum
    m = gt.matcher(grammar)
    results = [m.accept(t) for t in tok.encode(head + json.dumps(bad), allow_special=True)]
    assert not all(results) and m.error and m.is_terminated()
    # Without thinking allowed, a reasoning block is refused.
    m = gt.matcher(gt.grammar(tools=TOOLS, tool_choice="required"))
    assert not all(m.accept(t) for t in tok.encode("<think>", allow_special=True))


def test_kimi_markers_must_be_special_tokens(tokenizers):
    tok = tokenizers["kimi"]
    gt = _grammar_tokenizer(tok)
    m = gt.matcher(gt.grammar(tools=TOOLS, tool_choice="required"))
    # The section marker spelled as plain text (bytes) is refused: only the special token opens the section.
    assert not m.accept(tok.encode("<|tool_calls_section_begin|>")[0])
    m = gt.matcher(gt.grammar(tools=TOOLS, tool_choice="required"))
    assert m.accept(tok.special_id("<|tool_calls_section_begin|>"))


@pytest.mark.parametrize("vocab", ["byte", "kimi"])
def test_response_format_json_schema_and_union_with_auto_tools(tokenizers, vocab):
    tok = tokenizers[vocab]
    gt = _grammar_tokenizer(tok)
    fmt = {"type": "json_schema", "json_schema": {"name": "hotel", "schema": SCHEMAS["book_hotel"]}}
    rng = np.random.default_rng(2)
    requests = [gt.grammar(response_format=fmt)] * 4 + [gt.grammar(response_format={"type": "json_object"})] * 2 \
        + [gt.grammar(response_format=fmt, tools=TOOLS, tool_choice="auto")] * 4
    outputs, _ = _decode_batch(gt, tok, requests, rng)
    kinds = set()
    for r, ids in enumerate(outputs):
        parsed = parse_assistant(tok.decode(ids[:-1]))
        if parsed["tool_calls"]:
            assert r >= 6
            _check_tool_calls(tok.decode(ids[:-1]), set(SCHEMAS))
            kinds.add("call")
        else:
            value = json.loads(parsed["content"])
            if r < 4 or r >= 6:
                jsonschema.validate(value, SCHEMAS["book_hotel"])
            assert isinstance(value, dict)
            kinds.add("json")
    assert "json" in kinds
    # The union grammar of tool_choice "auto" + a JSON reply accepts both a tool-call section and the JSON reply.
    union = gt.grammar(response_format=fmt, tools=TOOLS, tool_choice="auto")
    section = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.book_hotel:0<|tool_call_argument_begin|>"
               '{"city": "Rome", "nights": 2}<|tool_call_end|><|tool_calls_section_end|>')
    for text in (section, '{"city": "Paris", "nights": 3}'):
        m = gt.matcher(union)
        assert all(m.accept(t) for t in tok.encode(text, allow_special=True)) and m.is_accepting()


def test_free_decoding_needs_no_grammar():
    assert request_grammar(tools=TOOLS, tool_choice="auto") is None
    assert request_grammar(tools=TOOLS, tool_choice="none") is None
    assert request_grammar(tools=TOOLS) is None
    assert request_grammar(response_format={"type": "text"}) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"tool_choice": "required"}, "needs at least one tool"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "'nope', which is not among the tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "'tools' is empty"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice='always' is invalid"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"}, r"tools\[0\]"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, "declared twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
      "tool_choice": "required"}, "must be a JSON schema of an object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}}}],
      "tool_choice": "required"}, "tool 'f': the JSON schema cannot be enforced: .*uniqueItems"),
    ({"response_format": {"type": "xml"}}, "type must be 'text', 'json_object' or 'json_schema'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs {'json_schema'"),
    ({"tools": TOOLS, "tool_choice": "required", "thinking": "maybe"}, "thinking='maybe' is invalid"),
    ({"tools": TOOLS, "tool_choice": "required", "thinking": "optional", "max_reasoning_tokens": -1},
     "max_reasoning_tokens must be an int >= 0"),
    ({"tools": TOOLS, "tool_choice": "required", "thinking": "optional", "max_reasoning_tokens": 8},
     "needs '</think>' to be one special token"),  # no special tokens given: the marker is text
])
def test_bad_requests_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        request_grammar(**kwargs)


def test_lenient_accepts_unimplemented_keywords(tokenizers):
    gt = _grammar_tokenizer(tokenizers["byte"])
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True, "maxItems": 2,
                                                "items": {"type": "integer"}}}, "required": ["xs"]}}}]
    assert gt.matcher(gt.grammar(tools=tools, tool_choice="required", lenient=True)) is not None


def test_grammar_tokenizer_and_batch_errors(tokenizers):
    tok = tokenizers["byte"]
    with pytest.raises(ValueError, match="cuts off ordinary tokens"):
        GrammarTokenizer(tok, 100)
    kimi = tokenizers["kimi"]  # like Kimi's: 258 special ids after the ranks, a model with 2 fewer logits
    narrow = GrammarTokenizer(kimi, kimi.vocab_size - 2, [kimi.special_id("<|im_end|>")])
    assert narrow.words == (kimi.vocab_size - 2 + 31) // 32
    with pytest.raises(ValueError, match="stop_token_ids"):
        GrammarTokenizer(tok, None, [999])
    gt = _grammar_tokenizer(tok)
    with pytest.raises(ValueError, match="invalid grammar"):
        gt.matcher("start: undefined_rule")
    m = gt.matcher(gt.grammar(tools=TOOLS, tool_choice="required"))
    with pytest.raises(ValueError, match="C-contiguous int32"):
        m.allowed_tokens_bitmask(np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="mask width"):
        BatchBitmask(2, 5000).fill({0: m})
    # The batch fill equals the per-matcher mask, and inactive rows stay all-ones.
    batch = BatchBitmask(3, gt.vocab_size)
    bitmask, active = batch.fill({1: m})
    assert active.tolist() == [False, True, False] and (bitmask[[0, 2]] == -1).all()
    np.testing.assert_array_equal(bitmask[1], m.allowed_tokens_bitmask())
    assert FLIGHT_SCHEMA["required"]  # the nested fixture schema is the one the tests above validate against


@pytest.mark.parametrize("thinking", ["optional", "open"])
def test_max_reasoning_tokens_forces_the_close_then_the_call(tokenizers, thinking):
    """With a reasoning budget of 6 tokens, the 6th reasoning token leaves only </think> allowed, and a call
    follows; within the budget a shorter thought closes freely; budget 0 allows no reasoning text at all."""
    tok = tokenizers["kimi"]
    gt = _grammar_tokenizer(tok)
    think_close = tok.special_id("</think>")
    opening = "" if thinking == "open" else "<think>"
    m = gt.matcher(gt.grammar(tools=TOOLS, tool_choice="required", thinking=thinking, max_reasoning_tokens=6))
    thought = tok.encode("one two three four five six seven", allow_special=True)
    assert len(thought) > 6
    for t in tok.encode(opening, allow_special=True) + thought[:6]:
        assert m.accept(t), m.error
    assert set(np.flatnonzero(unpack_bitmask(m.allowed_tokens_bitmask(), gt.vocab_size))) == {think_close}
    assert m.accept(think_close)
    head = "<|tool_calls_section_begin|><|tool_call_begin|>functions.book_hotel:0<|tool_call_argument_begin|>"
    for t in tok.encode(head + '{"city": "Rome", "nights": 2}<|tool_call_end|><|tool_calls_section_end|>',
                        allow_special=True):
        assert m.accept(t), m.error
    assert m.is_accepting()
    m = gt.matcher(gt.grammar(tools=TOOLS, tool_choice="required", thinking=thinking, max_reasoning_tokens=6))
    for t in tok.encode(opening, allow_special=True) + thought[:2] + [think_close]:
        assert m.accept(t), m.error
    m = gt.matcher(gt.grammar(tools=TOOLS, tool_choice="required", thinking=thinking, max_reasoning_tokens=0))
    for t in tok.encode(opening, allow_special=True):
        assert m.accept(t), m.error
    assert set(np.flatnonzero(unpack_bitmask(m.allowed_tokens_bitmask(), gt.vocab_size))) == {think_close}
