"""Serving: continuous-batching generation and an OpenAI-compatible HTTP server.

- `scheduler`: `Engine` (requests, slots, the waiting queue, stop rules); `runner`: its compiled prefill / decode
  steps, shape buckets and slot cache; `loading`: `load_model` (HF folder or orbax checkpoint) and the serving mesh.
- `cache`: the slot cache (KDA states, MLA latents) and the pure prefill / decode functions over it.
- `sampling`: temperature / top-k / top-p sampling and logprobs; `server`: the FastAPI app; `limits`: its
  per-request limits.
"""
