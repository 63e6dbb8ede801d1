"""Kimi tool calls through the OpenAI API (the official `openai` SDK against the HTTP server on 127.0.0.1): tools and
tool results round-trip through the chat template, tool calls come back parsed (plain and streamed), and
tool_choice="required" on a random-weight model yields 100% schema-valid calls while unconstrained requests in the
same batches are unchanged (greedy, compared to running them alone)."""

import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from k2jax import KimiLinear  # noqa: E402
from k2jax.chat import render_chat  # noqa: E402
from k2jax.serving.limits import ServerLimits  # noqa: E402
from k2jax.serving.scheduler import Engine, SamplingParams  # noqa: E402
from k2jax.serving.server import serve_in_thread  # noqa: E402
from tests.k2jax.chat.chat_fixtures import HOTEL_SCHEMA, TOOLS, synthetic_kimi_tokenizer  # noqa: E402
from tests.k2jax.serving.test_engine import serving_config  # noqa: E402

MODEL = "tiny-kimi"
MAX_LEN = 1024  # one length bucket: the prompt with the nested tool declared is 587 tokens
FLIGHT = TOOLS[:1]
NO_THINKING = {"chat_template_kwargs": {"thinking": False}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(engine, tokenizer, openai client) over a random 2-layer model and the synthetic Kimi tokenizer, served with
    the built-in Kimi K2 chat format."""
    tok = synthetic_kimi_tokenizer(tmp_path_factory.mktemp("kimi_tok"))
    model = KimiLinear(serving_config(vocab_size=672), rngs=nnx.Rngs(0))
    engine = Engine(model, tok, num_slots=8, max_len=MAX_LEN, min_bucket=MAX_LEN, max_prefill_batch=1,
                    eos_token_ids=[tok.eos_id])
    engine.warmup()
    with serve_in_thread(engine, tok, MODEL, ServerLimits(request_timeout_s=300)) as url:
        yield engine, tok, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)


def _check_call(call, tools):
    """The call names a declared tool, has a functions.NAME:IDX id and arguments valid under the tool's schema."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function" and call.function.name in schemas
    assert call.id.startswith(f"functions.{call.function.name}:")
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_tool_declarations_and_results_round_trip_through_the_template(served, monkeypatch):
    """The prompt the engine gets is the Kimi format of the whole conversation: tools declared, the assistant's
    earlier call (its id normalised to functions.NAME:IDX) and the tool's result tied to it."""
    engine, tok, client = served
    prompts = []
    real_submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda ids, *a, **k: (prompts.append(ids), real_submit(ids, *a, **k))[1])
    messages = [{"role": "user", "content": "Two nights in Rome?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_7", "type": "function",
                     "function": {"name": "book_hotel", "arguments": '{"city": "Rome", "nights": 2}'}}]},
                {"role": "tool", "tool_call_id": "call_7", "content": "booked"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS[1:], max_tokens=1,
                                         temperature=0, extra_body=NO_THINKING)
    assert out.usage.prompt_tokens == len(prompts[-1])
    text = tok.decode(prompts[-1])
    assert text == render_chat(messages, TOOLS[1:], thinking=False)
    assert "<|im_system|>tool_declare<|im_middle|>" + json.dumps(TOOLS[1:], separators=(",", ":")) in text
    assert ("<|tool_call_begin|>functions.book_hotel:0<|tool_call_argument_begin|>" in text
            and "## Return of functions.book_hotel:0\nbooked<|im_end|>" in text)
    client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS[1:], tool_choice="none",
                                   max_tokens=1, temperature=0, extra_body=NO_THINKING)
    assert tok.decode(prompts[-1]) == render_chat(messages, None, thinking=False)  # "none": tools left out


def test_named_tool_call_plain_and_streamed(served):
    """A named tool_choice forces a call on a random model; it comes back parsed with finish_reason "tool_calls",
    and the SDK's stream helper assembles the same call from the streamed deltas (name first, arguments in
    pieces)."""
    _, _, client = served
    body = dict(model=MODEL, messages=[{"role": "user", "content": "Paris for 2"}], tools=FLIGHT,
                tool_choice={"type": "function", "function": {"name": "search_flights"}}, max_tokens=400,
                temperature=1.0, seed=5, extra_body=NO_THINKING)
    out = client.chat.completions.create(**body)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name == "search_flights"
        _check_call(call, TOOLS)
    with client.chat.completions.stream(**body) as stream:
        kinds = []
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_completion()
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == \
        [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert "tool_calls.function.arguments.delta" in kinds and "tool_calls.function.arguments.done" in kinds


def test_50_required_calls_validate_in_batches_mixed_with_free_requests(served):
    """50 tool_choice="required" requests with the nested schema, sampled, all running beside 10 greedy free
    requests: every call parses and validates, and each free reply equals the reply it gets alone."""
    engine, _, client = served
    free = [dict(model=MODEL, messages=[{"role": "user", "content": f"say {i}"}], max_tokens=12, temperature=0,
                 extra_body={**NO_THINKING, "ignore_eos": True}) for i in range(10)]
    alone = [client.chat.completions.create(**b).choices[0].message.content for b in free]
    constrained = [dict(model=MODEL, messages=[{"role": "user", "content": f"trip {i}"}], tools=FLIGHT,
                        tool_choice="required", parallel_tool_calls=i % 5 == 0, max_tokens=MAX_LEN - 600,
                        temperature=1.0, seed=i, extra_body=NO_THINKING) for i in range(50)]
    jobs = [("free", i, b) for i, b in enumerate(free)] + [("tool", i, b) for i, b in enumerate(constrained)]
    order = np.random.default_rng(0).permutation(len(jobs))
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda j: (j[0], j[1], client.chat.completions.create(**j[2])),
                                [jobs[k] for k in order]))
    calls = 0
    for kind, i, out in results:
        choice = out.choices[0]
        if kind == "free":
            assert choice.message.content == alone[i] and choice.message.tool_calls is None
            continue
        assert choice.finish_reason == "tool_calls", (i, choice)
        assert choice.message.tool_calls and (len(choice.message.tool_calls) == 1 or i % 5 == 0)
        for call in choice.message.tool_calls:
            _check_call(call, FLIGHT)
            calls += 1
    assert calls >= 50
    assert engine.num_unfinished == 0


def test_json_response_format_is_valid_json(served):
    _, _, client = served
    schema = HOTEL_SCHEMA
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "json"}], max_tokens=200, temperature=1.0, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "hotel", "schema": schema}},
        extra_body=NO_THINKING)
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)


@pytest.mark.parametrize("body, needle", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "'fly'"),
    ({"tool_choice": "required"}, "needs 'tools'"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "'sometimes' is invalid"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "JSON schema of an object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": "low"}}}}}]}, "tools"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"chat_template_kwargs": {"thinking": "maybe"}}, "thinking"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role 'robot'"),
    ({"max_reasoning_tokens": 8}, "bounds the reasoning of a constrained reply"),
    ({"tools": TOOLS, "tool_choice": "required", "max_reasoning_tokens": -1}, "max_reasoning_tokens=-1"),
])
def test_bad_tool_requests_get_400_and_the_server_carries_on(served, body, needle):
    _, _, client = served
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/chat/completions", body={**base, **body}, cast_to=object)
    assert needle in e.value.body["message"], e.value.body
    ok = client.chat.completions.create(**base, extra_body=NO_THINKING)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_engine_masks_leave_free_rows_bit_identical(served):
    """In the engine itself: greedy free requests decoded beside constrained ones produce the same tokens and
    logprobs as alone (the device-side mask touches only constrained rows)."""
    engine, tok, _ = served
    prompts = [tok.encode(f"free {i}") for i in range(3)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
    alone = engine.generate(prompts, params)
    grammar = engine.grammar_tokenizer.grammar(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    reqs = [engine.submit(tok.encode(f"call {i}"), SamplingParams(max_tokens=300, temperature=1.0, seed=i),
                          grammar=grammar) for i in range(3)]
    mixed = engine.generate(prompts, params)
    for a, b in zip(alone, mixed):
        assert a.token_ids == b.token_ids
        assert [(lp.logprob, lp.top) for lp in a.logprobs] == [(lp.logprob, lp.top) for lp in b.logprobs]
    for r in reqs:
        r.wait(300)
        assert r.finish_reason == "stop" and r.grammar.ended


def test_agent_loop_example_runs_a_tool_and_answers(served):
    """examples/agent_loop.py against the server: the required first turn calls one of its two tools, the result
    goes back as a tool message tied to the call's id, and the loop ends."""
    _, _, client = served
    spec = importlib.util.spec_from_file_location("agent_loop", Path(__file__).parents[3] / "examples/agent_loop.py")
    agent_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent_loop)
    messages = agent_loop.agent(client, MODEL, "2+2?", max_turns=2, require_tool=True, max_tokens=120,
                                thinking=False)
    call = messages[1]["tool_calls"][0]
    assert call["function"]["name"] in agent_loop.TOOLS
    assert messages[2]["role"] == "tool" and messages[2]["tool_call_id"] == call["id"]


@pytest.fixture
def scripted(served, monkeypatch):
    """Make the served model write a given text (token by token, through the real engine and server path) for the
    next request, which must be the only one running: yields a function that sets the text."""
    engine, tok, _ = served
    script = []
    real_prefill, real_decode = engine.runner.prefill, engine.runner.decode

    def forced(out, row):
        tokens = np.array(out.tokens)
        tokens[row] = script.pop(0) if script else tok.special_id("<|im_end|>")
        return out._replace(tokens=tokens)

    monkeypatch.setattr(engine.runner, "prefill", lambda *a, **k: forced(real_prefill(*a, **k), 0))
    monkeypatch.setattr(engine.runner, "decode",
                        lambda tokens, active, *a, **k: forced(real_decode(tokens, active, *a, **k),
                                                              int(np.flatnonzero(active)[0])))
    return lambda text: script.extend(tok.encode(text, allow_special=True))


SCRIPT = ("<think>Rome, two nights.</think>Booking.<|tool_calls_section_begin|><|tool_call_begin|>"
          "functions.book_hotel:0<|tool_call_argument_begin|>{\"city\": \"Rome\", \"nights\": 2}<|tool_call_end|>"
          "<|tool_call_begin|>functions.book_hotel:1<|tool_call_argument_begin|>{\"city\": \"Paris\", "
          "\"nights\": 1}<|tool_call_end|><|tool_calls_section_end|><|im_end|>")


def test_reasoning_content_and_tool_calls_parsed_plain_and_streamed(served, scripted):
    """What the model writes (reasoning, content, two calls) comes back split into reasoning_content, content and
    tool_calls, whole and as stream deltas (reasoning and content in pieces, each call's name before its
    arguments), with finish_reason "tool_calls"."""
    _, _, client = served
    body = dict(model=MODEL, messages=[{"role": "user", "content": "Rome"}], tools=TOOLS[1:], max_tokens=100)
    scripted(SCRIPT)
    msg = client.chat.completions.create(**body).choices[0]
    assert msg.finish_reason == "tool_calls"
    assert msg.message.model_extra["reasoning_content"] == "Rome, two nights."
    assert msg.message.content == "Booking."
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in msg.message.tool_calls] == [
        ("functions.book_hotel:0", "book_hotel", {"city": "Rome", "nights": 2}),
        ("functions.book_hotel:1", "book_hotel", {"city": "Paris", "nights": 1})]
    scripted(SCRIPT)
    reasoning, content, calls, finish, order = "", "", {}, None, []
    for chunk in client.chat.completions.create(**body, stream=True):
        choice = chunk.choices[0]
        delta = choice.delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            order.append(("name" if tc.function.name else "args", tc.index))
            call["name"] += tc.function.name or ""
            call["arguments"] += tc.function.arguments or ""
        finish = choice.finish_reason or finish
    assert (reasoning, content, finish) == ("Rome, two nights.", "Booking.", "tool_calls")
    assert [(c["id"], c["name"], c["arguments"]) for c in calls.values()] == [
        (c.id, c.function.name, c.function.arguments) for c in msg.message.tool_calls]
    assert order[0] == ("name", 0) and order.index(("name", 1)) > order.index(("args", 0))


def test_reply_call_ids_continue_the_conversations_count(served, scripted):
    """Two calls were made earlier in the conversation, and the model writes indices 0 and 1 again (from memory):
    the reply's ids are functions.book_hotel:2 and :3, plain and streamed, the ids the next request's history is
    normalised to, so a client never gets an id that names an earlier call."""
    _, _, client = served
    earlier = [{"id": f"call_{i}", "type": "function",
                "function": {"name": "book_hotel", "arguments": json.dumps({"city": c, "nights": 1})}}
               for i, c in enumerate(["Oslo", "Bern"])]
    messages = [{"role": "user", "content": "Book Oslo and Bern"},
                {"role": "assistant", "content": None, "tool_calls": earlier},
                {"role": "tool", "tool_call_id": "call_0", "content": "booked"},
                {"role": "tool", "tool_call_id": "call_1", "content": "booked"},
                {"role": "user", "content": "Now Rome and Paris"}]
    body = dict(model=MODEL, messages=messages, tools=TOOLS[1:], max_tokens=100)
    scripted(SCRIPT)
    calls = client.chat.completions.create(**body).choices[0].message.tool_calls
    assert [c.id for c in calls] == ["functions.book_hotel:2", "functions.book_hotel:3"]
    scripted(SCRIPT)
    streamed = [tc.id for chunk in client.chat.completions.create(**body, stream=True)
                for tc in chunk.choices[0].delta.tool_calls or [] if tc.id]
    assert streamed == ["functions.book_hotel:2", "functions.book_hotel:3"]


def test_max_reasoning_tokens_ends_the_thinking_and_the_call_follows(served):
    """A thinking prompt (it ends with <think>) and tool_choice "required": the random model would reason until
    max_tokens and never call; with max_reasoning_tokens=4 the reasoning stops after 4 tokens and a valid call
    follows, within max_tokens."""
    _, _, client = served
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Rome"}], tools=TOOLS[1:], tool_choice="required",
        max_tokens=120, logprobs=True, parallel_tool_calls=False,
        extra_body={"chat_template_kwargs": {"thinking": True}, "max_reasoning_tokens": 4})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    tokens = [t.token for t in choice.logprobs.content]  # one per generated token (re-encoding text can differ)
    assert "</think>" in tokens[:5], tokens
    _check_call(choice.message.tool_calls[0], TOOLS[1:])


def test_a_grammar_failure_fails_only_its_request(served):
    """A matcher that rejects the sampled token ends its own request with an error; a constrained and a free
    request running beside it finish normally."""
    engine, tok, _ = served
    grammar = engine.grammar_tokenizer.grammar(tools=TOOLS[1:], tool_choice="required", parallel_tool_calls=False)
    broken = engine.grammar_tokenizer.matcher(grammar)
    broken.accept = lambda token_id: False
    params = SamplingParams(max_tokens=100, temperature=1.0, seed=3)
    bad = engine.submit(tok.encode("a"), params, grammar=broken)
    good = engine.submit(tok.encode("b"), params, grammar=grammar)
    free = engine.submit(tok.encode("c"), SamplingParams(max_tokens=5, ignore_eos=True))
    assert bad.wait(300).finish_reason == "error" and "grammar rejected" in bad.error
    assert good.wait(300).finish_reason == "stop" and good.grammar.ended
    assert free.wait(300).finish_reason == "length" and len(free.token_ids) == 5
    with pytest.raises(ValueError, match="fresh"):
        engine.submit(tok.encode("d"), params, grammar=good.grammar)
