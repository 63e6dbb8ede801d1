"""Parsing what a Kimi K2 model writes: reasoning, content and tool calls, whole or streamed.

The format (Moonshot's tool-call guidance and the K2 / K2-Thinking chat templates; see k2jax.chat.template):

    <think> reasoning </think> content
    <|tool_calls_section_begin|>
      <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|>
      ... more calls ...
    <|tool_calls_section_end|>

The markers are special tokens in Kimi's vocabulary; the parser reads decoded text in which they are spelled out
(decode with special tokens kept). Rules, as vLLM's `kimi_k2` tool and reasoning parsers, and stricter where
those lose or corrupt output:
- Reasoning is a leading `<think>` block (or everything from the start when the prompt itself ended with
  `<think>`: `reasoning_open=True`). It ends at `</think>` or, when the model goes straight into the tool-call
  section without closing it, at the section marker.
- The singular `<|tool_call_section_begin|>` / `<|tool_call_section_end|>` variant is accepted.
- A call's id must read `functions.NAME:IDX` (a bare `NAME:IDX` is accepted and given the `functions.` prefix);
  the name is the id without the prefix and the `:IDX` suffix, so names with dots survive (vLLM keeps only the text
  after the last dot).
- The ids handed out are unique within the turn, and follow the conversation's own count when it is known. IDX is
  the index of the call among all calls of the conversation, which the model writes from memory: it can repeat an
  earlier index or give two parallel calls the same one, and a client that tells calls apart by id would then
  answer the wrong one. With `first_call_index` (the number of calls earlier in the conversation, what the server
  counts while rendering the prompt) the i-th call of the turn gets `functions.NAME:{first_call_index + i}`, the id
  the next request's history is normalised to anyway (k2jax.chat.template.normalize_tool_call_ids); without it the
  model's IDX is kept unless this turn already used it, and a repeat gets one past the largest index in the turn.
- A malformed call (no argument marker, a bad id, arguments that are not a JSON object, or a call cut off by the
  end of the text) is reported as content, marker text included, so nothing is lost and no client receives
  unparseable arguments. vLLM instead passes malformed argument text through as a tool call, or on an exception
  returns the whole output as content.
- A trailing `<|im_end|>` (the end of the assistant turn) is dropped.

Streaming (`StreamParser`) yields OpenAI chat-completion chunk deltas: `{"reasoning_content": str}`,
`{"content": str}` and, per call, `{"tool_calls": [{"index", "id", "type": "function", "function": {"name",
"arguments": ""}}]}` followed by `{"tool_calls": [{"index", "function": {"arguments": piece}}]}` deltas, one per
fed piece the arguments spanned. A call is released when its `<|tool_call_end|>` arrives and has been checked, so
a call that turns out malformed never reaches the client as a call. Markers split across pieces are held back
until they can be told apart from text. `parse_assistant` runs the same machine over the whole text, so both
modes always agree.
"""

from __future__ import annotations

import json
import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
SECTION_BEGIN_SINGULAR, SECTION_END_SINGULAR = "<|tool_call_section_begin|>", "<|tool_call_section_end|>"
CALL_BEGIN, ARGUMENT_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
TURN_END = "<|im_end|>"
TOOL_MARKERS = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)

_SECTION_BEGINS = (SECTION_BEGIN, SECTION_BEGIN_SINGULAR)
_SECTION_ENDS = (SECTION_END, SECTION_END_SINGULAR)
_TOOL_CALL_ID = re.compile(r"(?:functions\.)?(?P<name>[^\s:<>]+):(?P<index>\d+)")

# Parser states.
_START, _REASONING, _CONTENT, _SECTION, _CALL_ID, _CALL_ARGS = range(6)


def tool_call_id(name: str, index: int) -> str:
    """The id Kimi's format gives the index-th tool call of a conversation: 'functions.NAME:IDX'."""
    return f"functions.{name}:{index}"


def split_tool_call_id(call_id: str) -> tuple[str, int] | None:
    """(name, index) of a 'functions.NAME:IDX' (or 'NAME:IDX') id, None when the id has another form."""
    m = _TOOL_CALL_ID.fullmatch(call_id.strip())
    return (m["name"], int(m["index"])) if m else None


def _held_back(text: str, markers) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of markers (it may be a marker's start)."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest


def _first_marker(text: str, markers) -> tuple[int, str | None]:
    """(position, marker) of the earliest marker in text, (-1, None) if none."""
    best, found = -1, None
    for marker in markers:
        i = text.find(marker)
        if i >= 0 and (best < 0 or i < best):
            best, found = i, marker
    return best, found


class StreamParser:
    """Incremental parser of one assistant turn (see the module docstring).

    feed(text_piece) -> list of deltas for the text so far that can no longer change; finish() -> the remaining
    deltas once the turn has ended. Afterwards `reasoning_content`, `content` (str, '' when none) and `tool_calls`
    (OpenAI-shaped dicts) hold the whole turn. reasoning_open: the prompt ended with `<think>`, so the output
    starts inside the reasoning. first_call_index: calls earlier in the conversation (the i-th call of this turn
    gets index first_call_index + i), or None to keep the model's indices, made unique within the turn (module
    docstring).
    """

    def __init__(self, reasoning_open: bool = False, first_call_index: int | None = None):
        if first_call_index is not None and (isinstance(first_call_index, bool) or not isinstance(first_call_index, int)
                                             or first_call_index < 0):
            raise ValueError(f"StreamParser: first_call_index must be an int >= 0 or None, got {first_call_index!r}")
        self.first_call_index = first_call_index
        self.state = _REASONING if reasoning_open else _START
        self.buf = ""  # text fed but not yet consumed
        self.consumed = 0  # absolute offset of buf[0] in the whole text
        self.piece_ends: list[int] = []  # absolute end offset of every fed piece (argument piece boundaries)
        self.reasoning_parts: list[str] = []
        self.content_parts: list[str] = []
        self.tool_calls: list[dict] = []
        self.finished = False
        self._call_id_raw = ""
        self._args_start = 0

    # ---- results -----------------------------------------------------------------------------------------------
    @property
    def reasoning_content(self) -> str:
        return "".join(self.reasoning_parts)

    @property
    def content(self) -> str:
        return "".join(self.content_parts)

    def result(self) -> dict:
        """{"reasoning_content": str | None, "content": str | None, "tool_calls": [...]} of what was parsed (None
        where there is no text)."""
        return {"reasoning_content": self.reasoning_content or None, "content": self.content or None,
                "tool_calls": [dict(c) for c in self.tool_calls]}

    def finish_reason(self, engine_reason: str) -> str:
        """The OpenAI finish_reason: 'tool_calls' when the turn stopped normally after making calls."""
        return "tool_calls" if engine_reason == "stop" and self.tool_calls else engine_reason

    # ---- driving -------------------------------------------------------------------------------------------------
    def feed(self, piece: str) -> list[dict]:
        """Add the next piece of decoded text; returns the deltas it released."""
        if self.finished:
            raise ValueError("StreamParser.feed: the turn has already finished")
        if not isinstance(piece, str):
            raise ValueError(f"StreamParser.feed: expected a str piece, got {type(piece).__name__}")
        if not piece:
            return []
        self.buf += piece
        self.piece_ends.append(self.consumed + len(self.buf))
        return self._advance(final=False)

    def finish(self) -> list[dict]:
        """End the turn: release everything still held back (an unfinished call becomes content)."""
        if self.finished:
            return []
        out = self._advance(final=True)
        self.finished = True
        return out

    # ---- the state machine ---------------------------------------------------------------------------------------
    def _consume(self, n: int) -> str:
        text, self.buf, self.consumed = self.buf[:n], self.buf[n:], self.consumed + n
        return text

    def _reasoning(self, out: list, text: str):
        if text:
            self.reasoning_parts.append(text)
            out.append({"reasoning_content": text})

    def _content(self, out: list, text: str):
        if text:
            self.content_parts.append(text)
            out.append({"content": text})

    def _text_until(self, out: list, emit, markers, final: bool) -> str | None:
        """Emit buf up to the first of markers and consume the marker (returned); None when no marker is complete
        (then everything that cannot be the start of one is emitted)."""
        i, marker = _first_marker(self.buf, markers)
        if marker is not None:
            emit(out, self._consume(i))
            self._consume(len(marker))
            return marker
        keep = 0 if final else _held_back(self.buf, markers)
        emit(out, self._consume(len(self.buf) - keep))
        return None

    def _advance(self, final: bool) -> list[dict]:
        out: list[dict] = []
        while True:
            if self.state == _START:
                stripped = self.buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self._consume(len(self.buf) - len(stripped) + len(THINK_OPEN))
                    self.state = _REASONING
                elif not final and THINK_OPEN.startswith(stripped):
                    return out  # still could become <think>
                else:
                    self.state = _CONTENT
            elif self.state == _REASONING:
                marker = self._text_until(out, self._reasoning, (THINK_CLOSE,) + _SECTION_BEGINS, final)
                if marker is None:
                    return out
                self.state = _CONTENT if marker == THINK_CLOSE else _SECTION
            elif self.state == _CONTENT:
                if self._content_step(out, final):
                    self.state = _SECTION
                else:
                    return out
            elif self.state == _SECTION:
                if not self._section_step(out, final):
                    return out
            elif self.state == _CALL_ID:
                if not self._call_id_step(out, final):
                    return out
            elif self.state == _CALL_ARGS:
                if not self._call_args_step(out, final):
                    return out

    def _content_step(self, out: list, final: bool) -> bool:
        """Content up to a section marker (True when one was consumed); a trailing <|im_end|> is dropped."""
        i, marker = _first_marker(self.buf, _SECTION_BEGINS)
        if marker is not None:
            self._content(out, self._consume(i))
            self._consume(len(marker))
            return True
        if final:
            text = self._consume(len(self.buf))
            self._content(out, text[:-len(TURN_END)] if text.endswith(TURN_END) else text)
            return False
        keep = _held_back(self.buf, _SECTION_BEGINS + (TURN_END,))
        if self.buf.endswith(TURN_END):  # the turn may end here: hold it until we know
            keep = max(keep, len(TURN_END))
        self._content(out, self._consume(len(self.buf) - keep))
        return False

    def _section_step(self, out: list, final: bool) -> bool:
        """Between calls: whitespace is dropped, a call or the section end is taken, other text is content."""
        stripped = self.buf.lstrip()
        self._consume(len(self.buf) - len(stripped))
        for marker in _SECTION_ENDS:
            if stripped.startswith(marker):
                self._consume(len(marker))
                self.state = _CONTENT
                return True
        if stripped.startswith(CALL_BEGIN):
            self._consume(len(CALL_BEGIN))
            self.state, self._call_id_raw = _CALL_ID, ""
            return True
        markers = (CALL_BEGIN,) + _SECTION_ENDS
        if not stripped or (not final and any(m.startswith(stripped) for m in markers)):
            return False  # a marker may still be arriving (or the text ended inside the section: fine)
        i, marker = _first_marker(self.buf, markers)
        if marker is not None:
            self._content(out, self._consume(i))  # stray text inside the section: keep it as content
            return True
        keep = 0 if final else _held_back(self.buf, markers)
        self._content(out, self._consume(len(self.buf) - keep))
        return False

    def _call_id_step(self, out: list, final: bool) -> bool:
        i, marker = _first_marker(self.buf, (ARGUMENT_BEGIN, CALL_END, CALL_BEGIN) + _SECTION_ENDS)
        if marker == ARGUMENT_BEGIN:
            self._call_id_raw = self._consume(i)
            self._consume(len(ARGUMENT_BEGIN))
            self._args_start = self.consumed
            self.state = _CALL_ARGS
            return True
        if marker is not None:  # the call ended (or another began) before its arguments: malformed
            self._content(out, CALL_BEGIN + self._consume(i))
            self.state = _SECTION
            return True
        if final:
            self._content(out, CALL_BEGIN + self._consume(len(self.buf)))
            self.state = _SECTION
        return False

    def _call_args_step(self, out: list, final: bool) -> bool:
        i, marker = _first_marker(self.buf, (CALL_END, CALL_BEGIN) + _SECTION_ENDS)
        if marker == CALL_END:
            start = self.consumed
            args = self._consume(i)
            self._consume(len(CALL_END))
            self._release_call(out, args, start)
            self.state = _SECTION
            return True
        raw = CALL_BEGIN + self._call_id_raw + ARGUMENT_BEGIN
        if marker is not None:  # another call or the section end before this call ended: malformed
            self._content(out, raw + self._consume(i))
            self.state = _SECTION
            return True
        if final:
            self._content(out, raw + self._consume(len(self.buf)))
            self.state = _SECTION
        return False

    def _call_index(self, model_index: int) -> int:
        """The IDX of the next call's id: the conversation's count, or the model's own unless already used."""
        if self.first_call_index is not None:
            return self.first_call_index + len(self.tool_calls)
        used = {split_tool_call_id(c["id"])[1] for c in self.tool_calls}
        return model_index if model_index not in used else max(used) + 1

    def _release_call(self, out: list, args: str, start: int):
        """Check a complete call; emit it as tool-call deltas, or as content when malformed."""
        parsed_id = split_tool_call_id(self._call_id_raw)
        try:
            valid = parsed_id is not None and isinstance(json.loads(args), dict)
        except ValueError:
            valid = False
        if not valid:
            self._content(out, CALL_BEGIN + self._call_id_raw + ARGUMENT_BEGIN + args + CALL_END)
            return
        name, idx = parsed_id
        index = len(self.tool_calls)
        call = {"id": tool_call_id(name, self._call_index(idx)), "type": "function",
                "function": {"name": name, "arguments": args}}
        self.tool_calls.append(call)
        out.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                    "function": {"name": name, "arguments": ""}}]})
        # The arguments in the pieces they arrived in (a piece boundary inside them splits them).
        cuts = [e - start for e in self.piece_ends if start < e < start + len(args)]
        for a, b in zip([0] + cuts, cuts + [len(args)]):
            if b > a:
                out.append({"tool_calls": [{"index": index, "function": {"arguments": args[a:b]}}]})


def parse_assistant(text: str, *, reasoning_open: bool = False, first_call_index: int | None = None) -> dict:
    """Split a finished assistant turn into {"reasoning_content": str | None, "content": str | None,
    "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": str}}, ...]}.

    text: decoded model output with special tokens spelled out; reasoning_open: the prompt ended with `<think>`;
    first_call_index: as in StreamParser. Never raises on model output: what cannot be parsed is returned as content (see the module docstring).
    """
    if not isinstance(text, str):
        raise ValueError(f"parse_assistant: text must be a str, got {type(text).__name__}")
    parser = StreamParser(reasoning_open=reasoning_open, first_call_index=first_call_index)
    parser.feed(text)
    parser.finish()
    return parser.result()


def merge_deltas(deltas: list[dict]) -> dict:
    """Accumulate streamed deltas the way an OpenAI client does: {"reasoning_content", "content", "tool_calls"}."""
    reasoning, content, calls = [], [], {}
    for d in deltas:
        reasoning.append(d.get("reasoning_content") or "")
        content.append(d.get("content") or "")
        for tc in d.get("tool_calls") or []:
            call = calls.setdefault(tc["index"], {"id": None, "type": "function",
                                                  "function": {"name": "", "arguments": ""}})
            call["id"] = tc.get("id") or call["id"]
            fn = tc.get("function") or {}
            call["function"]["name"] += fn.get("name") or ""
            call["function"]["arguments"] += fn.get("arguments") or ""
    return {"reasoning_content": "".join(reasoning) if any(reasoning) else None,
            "content": "".join(content) or None, "tool_calls": [calls[i] for i in sorted(calls)]}
