"""Serving: continuous-batching generation and an OpenAI-compatible HTTP server.

- `scheduler`: `Engine` (requests, slots, the waiting queue, stop rules); `runner`: `ModelRunner` (the model, the
  slot cache, the compiled prefill / decode steps and their shape buckets; no requests) and the pure step functions;
  `loading`: `load_model` (HF folder or orbax checkpoint; meshes are k2jax.sharding's).
- `cache`: the slot cache (KDA states, MLA latents): building it, reading views of it, writing updates into it.
- `sampling`: temperature / top-k / top-p sampling and logprobs; `server`: the FastAPI app; `limits`: its
  per-request limits.
"""
