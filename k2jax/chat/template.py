"""Chat prompts: a checkpoint's own Jinja chat template rendered as Hugging Face does, or the built-in Kimi K2 format.

`render_chat(messages, tools=None, **kwargs) -> str` is the prompt text with special tokens spelled out (what HF's
`apply_chat_template(..., tokenize=False)` returns); `encode_chat(tokenizer, ...)` turns it into token ids without
letting text from the request forge a special token.

HF compatibility (transformers `apply_chat_template` / `render_jinja_template`): an ImmutableSandboxedEnvironment
with trim_blocks, lstrip_blocks and the loop-controls extension (`{% break %}` / `{% continue %}`); `tojson` as
`json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, so `tojson(separators=(',', ':'))`
works; globals `raise_exception(msg)` and `strftime_now(fmt)`; the `{% generation %}` block tag (its body is rendered
as is); variables `messages`, `tools`, `documents`, `add_generation_prompt`, the tokenizer's special tokens
(`bos_token`, `eos_token`, ... from tokenizer_config.json) and every extra keyword (`chat_template_kwargs`, such as
`thinking`), which override special tokens of the same name. Messages are normalised as current transformers does:
keys whose value is None are dropped, and reasoning sent as `reasoning` or `thinking` is also passed as
`reasoning_content` (and `thinking`).

The built-in format is the Kimi K2 Thinking chat template (moonshotai/Kimi-K2-Thinking, chat_template.jinja,
revision "fix-default-system-prompt (#12)"), written out in Python; tests/k2jax/chat/test_template.py renders both
over a set of conversations and requires identical text. In that format:

    [<|im_system|>tool_declare<|im_middle|>TOOLS_JSON<|im_end|>]        tools, compact JSON, declared first
    [<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>]
                                                                           when the first message is not a system one
    per message: OPENER NAME<|im_middle|> BODY <|im_end|>
      OPENER: <|im_user|> for user, <|im_assistant|> for assistant, <|im_system|> for any other role (tool too);
      NAME: the message's `name`, else its role;
      assistant BODY: <think>REASONING</think>CONTENT[TOOL_CALLS], where REASONING is the message's
        reasoning_content for assistant messages after the last assistant message without tool calls (the turn in
        progress) and empty for earlier ones;
      TOOL_CALLS: <|tool_calls_section_begin|> then per call <|tool_call_begin|>ID<|tool_call_argument_begin|>ARGS
        <|tool_call_end|> (ARGS the arguments string as given, or a dict as JSON), then <|tool_calls_section_end|>;
      tool BODY: "## Return of TOOL_CALL_ID\n" + CONTENT;
    generation prompt: <|im_assistant|>assistant<|im_middle|>

Kwarg `thinking` (K2.5 / K2.6 convention; the K2-Thinking template has no such switch): None (default) renders the
K2-Thinking template exactly; True appends `<think>` to the generation prompt (the model continues inside its
reasoning, parse with reasoning_open=True, see `prompt_opens_reasoning`); False appends `<think></think>` (no
reasoning) and drops reasoning_content from the turn in progress too. Other kwargs are ignored, as a Jinja template
ignores variables it does not read. Image parts are not supported (text-only models).

Tool-call ids in the history are normalised to `functions.NAME:IDX` with one counter over the conversation
(`normalize_tool_call_ids`), as Moonshot's K2 vendor verifier advises: the model was trained on that form and
`## Return of ID` ties each result to its call.
"""

from __future__ import annotations

import json
import re
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from k2jax.chat.parser import (
    ARGUMENT_BEGIN,
    CALL_BEGIN,
    CALL_END,
    SECTION_BEGIN,
    SECTION_END,
    THINK_CLOSE,
    THINK_OPEN,
    tool_call_id,
)
from k2jax.tokenizer import IM_ASSISTANT, IM_END, IM_MIDDLE, IM_SYSTEM, IM_USER

KIMI_DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
GENERATION_PROMPT = IM_ASSISTANT + "assistant" + IM_MIDDLE
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Private-use characters that fence special-token text coming from the request (see encode_chat).
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"


# ---- HF-compatible Jinja ---------------------------------------------------------------------------------------------
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF marks assistant text with it): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A Jinja chat template with the special tokens it may read. source: the template text; special_tokens:
    {"bos_token": "[BOS]", ...} (passed to the template as variables). ValueError if the template does not
    compile."""

    def __init__(self, source: str, special_tokens: Mapping[str, object] | None = None, name: str = "template"):
        if not isinstance(source, str) or not source:
            raise ValueError(f"{name}: a chat template must be a non-empty string")
        try:
            self.template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{name}: chat template does not compile: {e} (line {e.lineno})") from None
        self.source, self.name = source, name
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: Sequence[dict], tools: Sequence[dict] | None = None, *,
               add_generation_prompt: bool = True, documents=None, **kwargs) -> str:
        """The template's text for already-prepared messages (see render_chat, which prepares them)."""
        variables = {**self.special_tokens, **kwargs}
        try:
            return self.template.render(messages=list(messages), tools=tools, documents=documents,
                                        add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.name}: rendering the chat template failed: {e}") from None


def load_chat_template(folder: str | Path) -> ChatTemplate | None:
    """The chat template a checkpoint folder ships, or None: `chat_template.jinja` (preferred, as in HF), else
    `chat_template` in tokenizer_config.json (a string, or a list of {"name", "template"} from which "default" is
    taken). Special tokens come from tokenizer_config.json. ValueError names a file that cannot be used."""
    folder = Path(folder)
    cfg: dict = {}
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_file}: not valid JSON: {e}") from None
    special = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(cfg.get(k))) is not None}
    extra = cfg.get("additional_special_tokens")
    if isinstance(extra, list):
        special["additional_special_tokens"] = [t for t in map(_token_text, extra) if t is not None]
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return ChatTemplate(jinja_file.read_text(encoding="utf-8"), special, name=str(jinja_file))
    source = cfg.get("chat_template")
    if source is None:
        return None
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(f"{cfg_file}: chat_template lists templates {sorted(map(str, named))} but none is "
                             f"named 'default'")
        source = named["default"]
    if not isinstance(source, str):
        raise ValueError(f"{cfg_file}: chat_template must be a string or a list of {{'name', 'template'}}, got "
                         f"{type(source).__name__}")
    return ChatTemplate(source, special, name=f"{cfg_file}:chat_template")


# ---- message preparation -----------------------------------------------------------------------------------------------
def _check_messages(messages) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise ValueError(f"message {i}: needs a non-empty string 'role', got {m!r}")
    return list(messages)


def _prepare(messages: Sequence[dict]) -> list[dict]:
    """Drop None-valued keys and alias reasoning fields, as transformers does before rendering."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def count_tool_calls(messages: Sequence[dict]) -> int:
    """How many tool calls the assistant messages of a (checked) conversation hold: the IDX of the next call's id
    `functions.NAME:IDX`, counting from 0 as `normalize_tool_call_ids` does."""
    return sum(len(m.get("tool_calls") or ()) for m in messages if m.get("role") == "assistant")


def normalize_tool_call_ids(messages: Sequence[dict]) -> list[dict]:
    """A copy of messages whose assistant tool calls carry ids `functions.NAME:IDX` (IDX counting every call of
    the conversation from 0) and whose tool results name the same ids. A result is matched to its call by the old
    id, or, when it has none, to the oldest call not yet answered; an id that matches no call is kept as is."""
    out, counter, renamed, unanswered = [], 0, {}, deque()
    for i, m in enumerate(_check_messages(messages)):
        m = dict(m)
        if m["role"] == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise ValueError(f"message {i}: tool_calls must be a list, got {type(m['tool_calls']).__name__}")
            calls = []
            for j, call in enumerate(m["tool_calls"]):
                fn = call.get("function") if isinstance(call, dict) else None
                name = fn.get("name") if isinstance(fn, dict) else None
                if not isinstance(name, str) or not name:
                    raise ValueError(f"message {i}: tool_calls[{j}] needs {{'function': {{'name': str, "
                                     f"'arguments': str or dict}}}}, got {call!r}")
                new_id = tool_call_id(name, counter)
                counter += 1
                if isinstance(call.get("id"), str):
                    renamed[call["id"]] = new_id
                unanswered.append(new_id)
                calls.append({**call, "id": new_id})
            m["tool_calls"] = calls
        elif m["role"] == "tool":
            old = m.get("tool_call_id")
            if old is None:
                if not unanswered:
                    raise ValueError(f"message {i}: a tool result without tool_call_id and no earlier tool call "
                                     f"left to answer")
                m["tool_call_id"] = unanswered.popleft()
            elif old in renamed:
                m["tool_call_id"] = renamed[old]
                if renamed[old] in unanswered:
                    unanswered.remove(renamed[old])
        out.append(m)
    return out


# ---- the built-in Kimi K2 format ---------------------------------------------------------------------------------------
def _text_of(m: dict, i: int) -> str:
    content = m.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"message {i}: only text content parts ({{'type': 'text', 'text': ...}}) are "
                                 f"supported, got {part!r}")
            parts.append(part["text"])
        return "".join(parts)
    raise ValueError(f"message {i}: content must be a string, a list of text parts or None, got "
                     f"{type(content).__name__}")


def _tool_calls_text(m: dict, i: int) -> str:
    out = [SECTION_BEGIN]
    for j, call in enumerate(m["tool_calls"]):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(call.get("id"), str):
            raise ValueError(f"message {i}: tool_calls[{j}] needs an 'id' and a 'function', got {call!r}")
        args = fn.get("arguments", "")
        if not isinstance(args, str):
            args = _tojson(args)
        out.append(CALL_BEGIN + call["id"] + ARGUMENT_BEGIN + args + CALL_END)
    return "".join(out + [SECTION_END])


def render_kimi_k2(messages: Sequence[dict], tools: Sequence[dict] | None = None, *,
                   add_generation_prompt: bool = True, thinking: bool | None = None, **_ignored) -> str:
    """The built-in Kimi K2 (Thinking) format of prepared messages (see the module docstring)."""
    if thinking not in (None, True, False):
        raise ValueError(f"thinking={thinking!r} is invalid: must be true, false or null")
    # Reasoning is kept only in the turn in progress: after the last assistant message without tool calls.
    last_final = max((i for i, m in enumerate(messages) if m["role"] == "assistant" and not m.get("tool_calls")),
                     default=-1)
    out = []
    if tools:
        out.append(IM_SYSTEM + "tool_declare" + IM_MIDDLE + _tojson(list(tools), separators=(",", ":")) + IM_END)
    if not messages or messages[0]["role"] != "system":
        out.append(IM_SYSTEM + "system" + IM_MIDDLE + KIMI_DEFAULT_SYSTEM + IM_END)
    for i, m in enumerate(messages):
        role = m["role"]
        name = m.get("name") or role
        if not isinstance(name, str):
            raise ValueError(f"message {i}: 'name' must be a string, got {name!r}")
        out.append({"user": IM_USER, "assistant": IM_ASSISTANT}.get(role, IM_SYSTEM) + name + IM_MIDDLE)
        if role == "assistant":
            reasoning = m.get("reasoning_content", "") if i > last_final and thinking is not False else ""
            if not isinstance(reasoning, str):
                raise ValueError(f"message {i}: reasoning_content must be a string, got {type(reasoning).__name__}")
            out.append(THINK_OPEN + reasoning + THINK_CLOSE + _text_of(m, i))
            if m.get("tool_calls"):
                out.append(_tool_calls_text(m, i))
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise ValueError(f"message {i}: a tool result needs a string 'tool_call_id', got {call_id!r}")
            out.append("## Return of " + call_id + "\n" + _text_of(m, i))
        else:
            out.append(_text_of(m, i))
        out.append(IM_END)
    if add_generation_prompt:
        out.append(GENERATION_PROMPT + {None: "", True: THINK_OPEN, False: THINK_OPEN + THINK_CLOSE}[thinking])
    return "".join(out)


# ---- entry points --------------------------------------------------------------------------------------------------------
def render_chat(messages: Sequence[dict], tools: Sequence[dict] | None = None, *,
                template: ChatTemplate | str | None = None, add_generation_prompt: bool = True,
                normalize_ids: bool = True, **kwargs) -> str:
    """The prompt text of a conversation, special tokens spelled out.

    messages: OpenAI-style [{"role", "content", "name"?, "tool_calls"?, "tool_call_id"?, "reasoning_content"?}];
    tools: OpenAI tool declarations [{"type": "function", "function": {"name", "description", "parameters"}}];
    template: a ChatTemplate (e.g. from load_chat_template), Jinja source, or None for the built-in Kimi K2 format;
    normalize_ids: rewrite tool-call ids to functions.NAME:IDX first; kwargs: template variables
    (chat_template_kwargs, e.g. thinking=False). ValueError names the message or template at fault.
    """
    if tools is not None and (isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence)
                              or not all(isinstance(t, dict) for t in tools)):
        raise ValueError("tools must be a list of {'type': 'function', 'function': {...}} dicts")
    messages = _check_messages(messages)
    if normalize_ids:
        messages = normalize_tool_call_ids(messages)
    messages = _prepare(messages)
    tools = list(tools) if tools else None
    if template is None:
        return render_kimi_k2(messages, tools, add_generation_prompt=add_generation_prompt, **kwargs)
    if isinstance(template, str):
        template = ChatTemplate(template)
    return template.render(messages, tools, add_generation_prompt=add_generation_prompt, **kwargs)


def prompt_opens_reasoning(prompt: str) -> bool:
    """Whether a rendered prompt leaves the model inside its reasoning (it ends with `<think>`): then parse the
    output with reasoning_open=True."""
    return prompt.endswith(THINK_OPEN)


def _mark_strings(obj, pattern: re.Pattern):
    """Fence every special-token string inside the request's strings (dict keys excepted) with private-use marks."""
    if isinstance(obj, str):
        obj = obj.replace(_MARK_OPEN, "").replace(_MARK_CLOSE, "")
        return pattern.sub(lambda m: _MARK_OPEN + m.group(0) + _MARK_CLOSE, obj)
    if isinstance(obj, dict):
        return {k: _mark_strings(v, pattern) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark_strings(v, pattern) for v in obj]
    return obj


def encode_chat(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None, *,
                template: ChatTemplate | str | None = None, add_generation_prompt: bool = True, **kwargs) -> list[int]:
    """Token ids of render_chat(...): the special tokens the template writes become special ids, while special-token
    text inside messages, tools or kwargs stays plain text (a user cannot forge `<|im_end|>`). tokenizer: a
    k2jax.tokenizer tokenizer (uses `specials`, `special_id` and `encode`)."""
    specials = sorted(tokenizer.specials, key=len, reverse=True)
    if not specials:
        return tokenizer.encode(render_chat(messages, tools, template=template,
                                            add_generation_prompt=add_generation_prompt, **kwargs))
    pattern = re.compile("|".join(map(re.escape, specials)))
    text = render_chat(_mark_strings(_check_messages(messages), pattern),
                       _mark_strings(tools, pattern) if tools is not None else None, template=template,
                       add_generation_prompt=add_generation_prompt, **_mark_strings(kwargs, pattern))
    fenced = re.compile(f"{_MARK_OPEN}({pattern.pattern}){_MARK_CLOSE}|({pattern.pattern})")
    ids, pos = [], 0

    def plain(s: str):
        # A mark the template separated from its token (e.g. by split()) still breaks the text, then is dropped.
        for piece in re.split(f"[{_MARK_OPEN}{_MARK_CLOSE}]", s):
            if piece:
                ids.extend(tokenizer.encode(piece))

    for m in fenced.finditer(text):
        plain(text[pos:m.start()])
        if m.group(1) is not None:
            ids.extend(tokenizer.encode(m.group(1)))
        else:
            ids.append(tokenizer.special_id(m.group(2)))
        pos = m.end()
    plain(text[pos:])
    return ids
