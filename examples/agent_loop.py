"""An agent with two Python tools, talking to `serve.py` through the official OpenAI SDK.

Start a server (a Kimi checkpoint; random weights and the byte tokenizer work too, for a dry run of the loop):

    python serve.py --checkpoint /path/to/Kimi-Linear-48B-A3B-Instruct --http --port 8000
    python examples/agent_loop.py --base-url http://127.0.0.1:8000/v1 "What is 17 * 23, and the time in UTC?"

The loop: send the conversation with the tool declarations; when the reply has `tool_calls`, run each tool, append
the assistant message (with its calls and reasoning) and one `tool` message per result, and ask again; stop at a
reply without calls (or after --max-turns). --require-tool makes the first turn use tool_choice="required", which
the server enforces with a grammar, so the call is well formed and its arguments match the schema.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import operator

from openai import OpenAI

# Arithmetic without eval(): the operators an agent's calculator needs.
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Mod: operator.mod}


def calculate(expression: str) -> str:
    """The value of an arithmetic expression (numbers, + - * / ** %, parentheses), as text."""
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))
        raise ValueError(f"unsupported expression element: {ast.dump(node)[:60]}")

    return str(value(ast.parse(expression, mode="eval").body))


def current_time(timezone_offset_hours: float = 0.0) -> str:
    """The current time at a UTC offset, ISO 8601."""
    tz = datetime.timezone(datetime.timedelta(hours=timezone_offset_hours))
    return datetime.datetime.now(tz).isoformat(timespec="seconds")


TOOLS = {"calculate": calculate, "current_time": current_time}
TOOL_DECLARATIONS = [
    {"type": "function", "function": {
        "name": "calculate", "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 60}},
                       "required": ["expression"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "current_time", "description": "The current time at a UTC offset in hours.",
        "parameters": {"type": "object",
                       "properties": {"timezone_offset_hours": {"type": "number", "minimum": -12, "maximum": 14}},
                       "additionalProperties": False}}},
]


def run_tool(call) -> str:
    """The result of one tool call as text (an error message when the call is bad: the model can correct it)."""
    fn = TOOLS.get(call.function.name)
    if fn is None:
        return f"error: no tool named {call.function.name!r}"
    try:
        return fn(**json.loads(call.function.arguments or "{}"))
    except Exception as e:  # the tool's failure goes back to the model, not up the loop
        return f"error: {type(e).__name__}: {e}"


def agent(client: OpenAI, model: str, question: str, *, max_turns: int = 5, require_tool: bool = False,
          max_tokens: int = 512, thinking: bool | None = None) -> list[dict]:
    """Run the loop for one question; returns the conversation (the last message is the final answer, or the
    last tool result when max_turns ran out)."""
    messages: list[dict] = [{"role": "user", "content": question}]
    extra = {"chat_template_kwargs": {"thinking": thinking}} if thinking is not None else {}
    for turn in range(max_turns):
        reply = client.chat.completions.create(
            model=model, messages=messages, tools=TOOL_DECLARATIONS, max_tokens=max_tokens, temperature=0,
            tool_choice="required" if require_tool and turn == 0 else "auto", extra_body=extra)
        msg = reply.choices[0].message
        reasoning = getattr(msg, "reasoning_content", None)  # a k2jax / Kimi extension field
        entry = {"role": "assistant", "content": msg.content or ""}
        if reasoning:
            entry["reasoning_content"] = reasoning
            print(f"[reasoning] {reasoning}")
        if not msg.tool_calls:
            messages.append(entry)
            print(f"[answer] {msg.content}")
            return messages
        entry["tool_calls"] = [c.model_dump() for c in msg.tool_calls]
        messages.append(entry)
        for call in msg.tool_calls:
            result = run_tool(call)
            print(f"[tool] {call.function.name}({call.function.arguments}) -> {result}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return messages


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("question")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="default: the first model the server lists")
    p.add_argument("--max-turns", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--require-tool", action="store_true", help="tool_choice='required' on the first turn")
    p.add_argument("--no-thinking", action="store_true", help="chat_template_kwargs thinking=false")
    args = p.parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key="k2jax")
    model = args.model or client.models.list().data[0].id
    agent(client, model, args.question, max_turns=args.max_turns, require_tool=args.require_tool,
          max_tokens=args.max_tokens, thinking=False if args.no_thinking else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
