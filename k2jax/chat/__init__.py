"""Kimi chat for the OpenAI API: prompt rendering (a checkpoint's Jinja template as Hugging Face renders it, or the
built-in Kimi K2 format), parsing of reasoning and tool calls (whole or streamed), and grammar-constrained decoding
that makes tool-call arguments valid under the tool's JSON schema by construction (k2jax.chat.grammar, with the
device-side mask in k2jax.chat.bitmask)."""

from k2jax.chat.parser import StreamParser, merge_deltas, parse_assistant, split_tool_call_id, tool_call_id
from k2jax.chat.template import (
                                 ChatTemplate,
                                 count_tool_calls,
                                 encode_chat,
                                 load_chat_template,
                                 normalize_tool_call_ids,
                                 prompt_opens_reasoning,
                                 render_chat,
                                 render_kimi_k2,
)

__all__ = ["ChatTemplate", "StreamParser", "count_tool_calls", "encode_chat", "load_chat_template", "merge_deltas",
           "normalize_tool_call_ids", "parse_assistant", "prompt_opens_reasoning", "render_chat", "render_kimi_k2",
           "split_tool_call_id", "tool_call_id"]
