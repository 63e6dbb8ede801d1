"""Shared test data for the k2jax.chat tests: a small Kimi-style tiktoken vocabulary and a nested tool schema."""

import base64
import json

from k2jax.tokenizer import KimiTokenizer

# Kimi's special tokens that matter for chat and tool calls (the real vocabulary has them at 163584+).
KIMI_SPECIALS = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
                 "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                 "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<think>", "</think>"]
# Words whose prefixes become merged tokens, so the vocabulary has multi-byte tokens as a BPE one does.
_WORDS = ["functions", ".search", "_flights", ".book", "_hotel", '": "', '", "', '": ', '{"', '"}', "true", "false",
          "null", " the", " and", "origin", "destination", "passengers", "cabin", "economy", "business", "first",
          "budget", "dates", "name", "age", "tags", "stops", "Paris", "Rome", " weather", "think", "123", "0.5",
          "uber", "rück", "日本"]


def synthetic_kimi_tokenizer(folder) -> KimiTokenizer:
    """A KimiTokenizer over a small rank file written to folder: 256 bytes + word-prefix merges + Kimi specials."""
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    for word in _WORDS:
        data = word.encode()
        for n in range(2, len(data) + 1):
            if data[:n] not in seen:
                seen.add(data[:n])
                tokens.append(data[:n])
    (folder / "tiktoken.model").write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
    base = len(tokens)
    config = {"added_tokens_decoder": {str(base + i): {"content": s, "special": True}
                                       for i, s in enumerate(KIMI_SPECIALS)},
              "bos_token": "[BOS]", "eos_token": "[EOS]"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return KimiTokenizer(folder / "tiktoken.model", config)


# A nested schema: objects, arrays of objects, enums, integers and numbers with bounds, required fields. Strings and
# arrays are bounded, so that random-logit decoding ends in a bounded number of steps.
FLIGHT_SCHEMA = {
    "type": "object",
    "properties": {
        "origin": {"type": "string", "maxLength": 6},
        "destination": {"type": "string", "enum": ["Paris", "Rome", "Tokyo"]},
        "cabin": {"type": "string", "enum": ["economy", "business", "first"]},
        "passengers": {
            "type": "array", "minItems": 1, "maxItems": 3,
            "items": {"type": "object",
                      "properties": {"name": {"type": "string", "maxLength": 5},
                                     "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                      "required": ["name", "age"], "additionalProperties": False}},
        "budget": {"type": "number", "minimum": 0, "maximum": 10000},
        "direct": {"type": "boolean"},
    },
    "required": ["origin", "destination", "passengers", "budget"],
    "additionalProperties": False,
}
HOTEL_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                   "nights": {"type": "integer", "minimum": 1, "maximum": 30}},
    "required": ["city", "nights"], "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "search_flights", "description": "Find flights.",
                                           "parameters": FLIGHT_SCHEMA}},
         {"type": "function", "function": {"name": "book_hotel", "description": "Book a hotel.",
                                           "parameters": HOTEL_SCHEMA}}]
