"""k2jax.chat.parser: reasoning / content / tool calls from Kimi K2 output, whole and streamed in any pieces."""

import json
import random

import pytest

from k2jax.chat import StreamParser, merge_deltas, parse_assistant, split_tool_call_id

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def call_text(call_id, args):
    return CB + call_id + AB + args + CE


def tool_call(call_id, name, args):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


CASES = {
    "content_only": ("Hello there.", {"content": "Hello there."}),
    "reasoning_then_content": ("<think>Let me see.</think>Answer: 4.<|im_end|>",
                               {"reasoning_content": "Let me see.", "content": "Answer: 4."}),
    "two_calls": ("<think>plan</think>Checking." + SB + call_text("functions.get_weather:0", '{"city": "Paris"}')
                  + "\n" + call_text("functions.get_weather:1", '{"city": "Rome"}') + SE,
                  {"reasoning_content": "plan", "content": "Checking.",
                   "tool_calls": [tool_call("functions.get_weather:0", "get_weather", '{"city": "Paris"}'),
                                  tool_call("functions.get_weather:1", "get_weather", '{"city": "Rome"}')]}),
    # K2-Thinking may go straight into the section without closing its reasoning.
    "unclosed_think": ("<think>need data" + SB + call_text("functions.search:3", '{"q": "x"}') + SE,
                       {"reasoning_content": "need data",
                        "tool_calls": [tool_call("functions.search:3", "search", '{"q": "x"}')]}),
    "singular_section_variant": ("<|tool_call_section_begin|>" + call_text("functions.f:0", "{}")
                                 + "<|tool_call_section_end|>", {"tool_calls": [tool_call("functions.f:0", "f", "{}")]}),
    "bare_id_and_dotted_name": (SB + call_text(" lookup:2 ", '{"a": [1, 2]}') + call_text("functions.mcp.fs.read:4", "{}")
                                + SE, {"tool_calls": [tool_call("functions.lookup:2", "lookup", '{"a": [1, 2]}'),
                                                      tool_call("functions.mcp.fs.read:4", "mcp.fs.read", "{}")]}),
    "malformed_json_is_content": (SB + call_text("functions.f:0", '{"a": ') + call_text("functions.g:1", '{"b": 2}') + SE,
                                  {"content": call_text("functions.f:0", '{"a": '),
                                   "tool_calls": [tool_call("functions.g:1", "g", '{"b": 2}')]}),
    "non_object_arguments_are_content": (SB + call_text("functions.f:0", "[1]") + SE,
                                         {"content": call_text("functions.f:0", "[1]")}),
    "bad_id_is_content": (SB + call_text("functions.f", "{}") + SE, {"content": call_text("functions.f", "{}")}),
    "missing_argument_marker_is_content": (SB + CB + "functions.f:0" + CE + call_text("functions.g:1", "{}") + SE,
                                           {"content": CB + "functions.f:0" + CE,
                                            "tool_calls": [tool_call("functions.g:1", "g", "{}")]}),
    "call_cut_off_is_content": ("Sure." + SB + CB + "functions.f:0" + AB + '{"a": 1',
                                {"content": "Sure." + CB + "functions.f:0" + AB + '{"a": 1'}),
    "text_after_section_kept": (SB + call_text("functions.f:0", "{}") + SE + " done",
                                {"content": " done", "tool_calls": [tool_call("functions.f:0", "f", "{}")]}),
    "im_end_inside_content_kept": ("a<|im_end|>b<|im_end|>", {"content": "a<|im_end|>b"}),
    "think_not_at_start_is_content": ("x <think>y</think>", {"content": "x <think>y</think>"}),
    "marker_lookalike_text": ("a <|tool_call is not a marker", {"content": "a <|tool_call is not a marker"}),
}


def expected(spec):
    return {"reasoning_content": spec.get("reasoning_content"), "content": spec.get("content"),
            "tool_calls": spec.get("tool_calls", [])}


@pytest.mark.parametrize("name", sorted(CASES))
def test_parse_assistant(name):
    text, spec = CASES[name]
    assert parse_assistant(text) == expected(spec)


def test_reasoning_open_prompt():
    # The prompt ended with <think>: the output starts inside the reasoning.
    out = parse_assistant("planning</think>Done.", reasoning_open=True)
    assert out == {"reasoning_content": "planning", "content": "Done.", "tool_calls": []}
    out = parse_assistant("planning" + SB + call_text("functions.f:0", "{}") + SE, reasoning_open=True)
    assert out["reasoning_content"] == "planning" and out["tool_calls"][0]["id"] == "functions.f:0"


def _chunkings(text, rng):
    yield list(text)  # one character at a time: every marker is split
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8)))) if len(text) > 1 else []
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("name", sorted(CASES))
def test_streaming_agrees_with_whole_parse_for_any_split(name):
    text, spec = CASES[name]
    rng = random.Random(name)
    for pieces in _chunkings(text, rng):
        parser = StreamParser()
        deltas = [d for p in pieces for d in parser.feed(p)] + parser.finish()
        assert merge_deltas(deltas) == expected(spec), pieces
        assert parser.result() == expected(spec)
        for d in deltas:  # no marker ever leaks into reasoning or content that is not content by the rules
            for key in ("reasoning_content", "content"):
                if key in d and not spec.get("content", "").count("<|"):
                    assert "<|" not in d[key]


def test_stream_delta_shapes():
    text = "<think>r</think>" + SB + call_text("functions.get_weather:0", '{"city": "Paris"}') + SE
    pieces = ["<thi", "nk>r</thi", "nk>", SB[:9], SB[9:] + CB + "functions.get_", "weather:0" + AB + '{"ci',
              'ty": "Pa', 'ris"}' + CE[:5], CE[5:] + SE]
    assert "".join(pieces) == text
    parser = StreamParser()
    deltas = [d for p in pieces for d in parser.feed(p)] + parser.finish()
    assert deltas[0] == {"reasoning_content": "r"}
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    # Name first (with id and type, empty arguments), then the arguments in the pieces they arrived in.
    assert calls[0] == {"index": 0, "id": "functions.get_weather:0", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    assert [c["function"]["arguments"] for c in calls[1:]] == ['{"ci', 'ty": "Pa', 'ris"}']
    assert all(set(c) == {"index", "function"} for c in calls[1:])
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris"}
    assert parser.finish_reason("stop") == "tool_calls" and parser.finish_reason("length") == "length"
    assert StreamParser().finish_reason("stop") == "stop"


def test_stream_holds_back_only_what_could_be_a_marker():
    parser = StreamParser()
    assert parser.feed("Hello <|tool") == [{"content": "Hello "}]  # '<|tool' may start the section marker
    assert parser.feed("s are fun") == [{"content": "<|tools are fun"}]
    assert parser.feed("<|im_end|>") == []  # possibly the end of the turn
    assert parser.finish() == []
    assert parser.result()["content"] == "Hello <|tools are fun"
    with pytest.raises(ValueError, match="already finished"):
        parser.feed("x")


def test_split_tool_call_id():
    assert split_tool_call_id("functions.get_weather:12") == ("get_weather", 12)
    assert split_tool_call_id("search:0") == ("search", 0)
    assert split_tool_call_id("call_abc123") is None
    with pytest.raises(ValueError, match="text must be a str"):
        parse_assistant(None)


def test_call_ids_are_unique_in_a_turn_and_follow_the_conversation_count():
    """The model writes IDX from memory: two parallel calls with the same index (or an index used earlier) must
    still reach the client as distinct ids; with the conversation's count known, the ids continue it."""
    text = (SB + call_text("functions.search:0", '{"q": "a"}') + call_text("functions.search:0", '{"q": "b"}')
            + call_text("functions.open:7", "{}") + SE)
    ids = [c["id"] for c in parse_assistant(text)["tool_calls"]]
    assert ids == ["functions.search:0", "functions.search:1", "functions.open:7"]
    ids = [c["id"] for c in parse_assistant(text, first_call_index=3)["tool_calls"]]
    assert ids == ["functions.search:3", "functions.search:4", "functions.open:5"]
    parser = StreamParser(first_call_index=3)  # streamed deltas carry the same ids
    deltas = [d for ch in text for d in parser.feed(ch)] + parser.finish()
    assert [d["tool_calls"][0]["id"] for d in deltas if "id" in d.get("tool_calls", [{}])[0]] == ids
    with pytest.raises(ValueError, match="first_call_index must be an int >= 0"):
        StreamParser(first_call_index=-1)
