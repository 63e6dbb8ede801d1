"""OpenAI-compatible HTTP API over an `Engine`: /v1/completions, /v1/chat/completions (both with SSE streaming),
/v1/models and /health. Built on FastAPI + uvicorn (the `serve` extra).

The engine runs in its own thread; each request registers a callback that hands the engine's events to the
request's asyncio queue. Bad requests (malformed JSON, wrong types, a prompt longer than the context, max_tokens
out of range, an unknown model) get a 4xx with an OpenAI-style error body, and the server keeps serving. A
streaming client that disconnects has its request aborted, freeing the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from k2jax.engine import Engine, Event, SamplingParams, TokenLogprob
from k2jax.tokenizer import IM_END


class APIError(Exception):
    """An error answered with `status` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def _error_response(status, message, type_="invalid_request_error", code=None, param=None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body)


# ---- request bodies -----------------------------------------------------------------------------------------------
class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # the OpenAI default for completions
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Any = None
    name: str | None = None


class ChatBody(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


# ---- the app ------------------------------------------------------------------------------------------------------
def create_app(engine: Engine, tokenizer, model_name: str) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name` (requests naming another model get 404). The engine's
    background thread is started with the app and stopped with it."""
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="k2jax", docs_url=None, redoc_url=None, lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return _error_response(e.status, e.message, e.type, e.code, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        parts = []
        for err in e.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error_response(400, "invalid request: " + "; ".join(parts))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "active": sum(s is not None for s in engine.slots),
                "waiting": len(engine.waiting)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "k2jax", "max_model_len": engine.max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        _check_model(body.model, model_name)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompts = _completion_prompts(body.prompt, tokenizer)
        params = _params(body, body.max_tokens, body.logprobs, [])
        run = _Run(engine, prompts, params)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return _sse(_completion_chunks(run, rid, model_name, tokenizer))
        await run.wait_or_abort()
        choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason,
                    "logprobs": _completion_logprobs(r.logprobs, tokenizer) if body.logprobs is not None else None}
                   for i, r in enumerate(run.reqs)]
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": run.usage()}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        _check_model(body.model, model_name)
        try:
            ids = tokenizer.apply_chat_template([m.model_dump(exclude_none=True) for m in body.messages])
        except (ValueError, KeyError, TypeError) as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        top = body.top_logprobs if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.logprobs and top is None:
            top = 0
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = _params(body, max_tokens, top, _end_of_turn(tokenizer))
        run = _Run(engine, [ids], params)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return _sse(_chat_chunks(run, rid, model_name, tokenizer))
        await run.wait_or_abort()
        r = run.reqs[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                  "logprobs": {"content": _chat_logprobs(r.logprobs, tokenizer)} if body.logprobs else None}
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": [choice], "usage": run.usage()}

    return app


# ---- helpers: validation ------------------------------------------------------------------------------------------
def _check_model(requested, served):
    if requested is not None and requested != served:
        raise APIError(404, f"the model {requested!r} does not exist; this server serves {served!r}",
                       code="model_not_found", param="model")


def _completion_prompts(prompt, tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if len(prompt) > 64:
        raise APIError(400, f"at most 64 prompts per request, got {len(prompt)}", param="prompt")
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]


def _end_of_turn(tokenizer) -> list[int]:
    try:
        return [tokenizer.special_id(IM_END)]
    except (ValueError, AttributeError):
        return []


def _params(body: _Common, max_tokens, logprobs, extra_stop_ids) -> SamplingParams:
    if body.n != 1:
        raise APIError(400, f"n={body.n} is not supported: only n=1", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise APIError(400, f"at most 4 stop sequences, got {len(stop)}", param="stop")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    p = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                       seed=body.seed, stop=stop, stop_token_ids=list(body.stop_token_ids or []) + extra_stop_ids,
                       ignore_eos=body.ignore_eos, logprobs=logprobs)
    try:
        p.validate()
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return p


# ---- helpers: running requests ------------------------------------------------------------------------------------
class _Run:
    """The engine requests of one HTTP request, with their events funnelled into one asyncio queue as
    (prompt index, Event)."""

    def __init__(self, engine: Engine, prompts, params):
        loop = asyncio.get_running_loop()
        self.engine, self.queue = engine, asyncio.Queue()
        self.reqs = []
        try:
            for i, ids in enumerate(prompts):
                self.reqs.append(engine.submit(ids, params, callback=self._forward(loop, i)))
        except ValueError as e:
            self.abort()
            raise APIError(400, str(e), param="prompt" if "prompt" in str(e) else "max_tokens") from None

    def _forward(self, loop, index: int):
        """An engine callback (engine thread) that queues (index, event) on the event loop's queue."""
        return lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, (index, ev))

    async def events(self):
        """Yield (index, Event) until every request finished; raises APIError(500) on an engine error."""
        left = len(self.reqs)
        while left:
            i, ev = await self.queue.get()
            if ev.finish_reason == "error":
                raise APIError(500, f"generation failed: {ev.error}", type_="server_error")
            left -= ev.finished
            yield i, ev

    async def wait_or_abort(self):
        """Wait for every request; if this is cancelled or fails, abort the ones still running."""
        try:
            async for _ in self.events():
                pass
        finally:
            self.abort()

    def abort(self):
        for r in self.reqs:
            if not r.finished:
                self.engine.abort(r)

    def usage(self) -> dict:
        p = sum(len(r.prompt_ids) for r in self.reqs)
        c = sum(len(r.token_ids) for r in self.reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(gen):
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(run: _Run, make_chunks):
    """Yield SSE lines from make_chunks(index, Event); abort the engine requests if the client goes away."""
    try:
        async for i, ev in run.events():
            for chunk in make_chunks(i, ev):
                yield _data(chunk)
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield _data({"error": {"message": e.message, "type": e.type, "param": None, "code": None}})
    finally:
        run.abort()


def _completion_chunks(run, rid, model_name, tokenizer):
    def make(i, ev: Event):
        if not ev.text and not ev.finished and not ev.logprobs:
            return []
        lp = _completion_logprobs(ev.logprobs, tokenizer) if ev.logprobs else None
        return [{"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                 "choices": [{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}]}]

    return _stream(run, make)


def _chat_chunks(run, rid, model_name, tokenizer):
    started = [False]

    def make(i, ev: Event):
        out = []
        base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name}
        if not started[0]:
            started[0] = True
            out.append({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        lp = {"content": _chat_logprobs(ev.logprobs, tokenizer)} if ev.logprobs else None
        if ev.text or lp:
            out.append({**base, "choices": [{"index": 0, "delta": {"content": ev.text}, "logprobs": lp,
                                             "finish_reason": None}]})
        if ev.finished:
            out.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                             "finish_reason": ev.finish_reason}]})
        return out

    return _stream(run, make)


# ---- helpers: logprobs --------------------------------------------------------------------------------------------
def _token_text(tokenizer, tid: int) -> str:
    return tokenizer.decode([tid])


def _completion_logprobs(lps: list[TokenLogprob] | None, tokenizer) -> dict:
    lps = lps or []
    toks = [_token_text(tokenizer, lp.token_id) for lp in lps]
    offsets, pos = [], 0
    for t in toks:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": toks, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{_token_text(tokenizer, i): v for i, v in lp.top} for lp in lps],
            "text_offset": offsets}


def _chat_logprobs(lps: list[TokenLogprob] | None, tokenizer) -> list[dict]:
    def entry(tid, v):
        t = _token_text(tokenizer, tid)
        return {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}

    return [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
            for lp in (lps or [])]


# ---- running ------------------------------------------------------------------------------------------------------
def make_server(engine: Engine, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000):
    """A `uvicorn.Server` for the app (call `.run()` to block, or run it in a thread; `.should_exit = True` stops
    it)."""
    import uvicorn

    app = create_app(engine, tokenizer, model_name)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
