"""OpenAI-compatible HTTP API over an `Engine`: /v1/completions, /v1/chat/completions (both with SSE streaming,
and a last usage chunk when asked with stream_options.include_usage), /v1/models, /health and /v1/stats (the
prefix cache's hits, cached tokens, evictions and bytes in use, the page pool's pages held by live sequences, by
the prefix cache, shared and free, and the engine's token counts). Every usage
reports prompt_tokens_details.cached_tokens: prompt tokens resumed from the prefix cache. Built on FastAPI + uvicorn (the `serve` extra).

The engine runs in its own thread; each request registers a callback that hands the engine's events to the
request's asyncio queue. No request can fail another, and every one gets an answer:
- bad requests (malformed JSON, wrong types or out-of-range sampling fields, a prompt longer than the context,
  an unknown model) get a 4xx with an OpenAI-style error body; the server keeps serving;
- `ServerLimits` bound what one client may ask: the body size (413), the queue of requests waiting for a slot
  (429 with Retry-After), the time a request may run (504 once it is over, and the engine drops it), and the
  max_tokens a chat request gets when it names none;
- prompts are tokenized in a worker thread, never on the event loop, after a cheap length bound;
- a client that disconnects (streaming or not) has its requests aborted, freeing their slots;
- if the engine thread dies, /health answers 503, running requests end with a 503 error and new ones get 503.

Chat (k2jax.chat): prompts are rendered with the checkpoint's chat template (`chat_template`, from
k2jax.chat.load_chat_template) or the built-in Kimi K2 format, with `tools` declared and `chat_template_kwargs`
(e.g. `thinking`) passed to it; history may hold assistant `tool_calls` / `reasoning_content` and `tool` results
(ids normalised to `functions.NAME:IDX`). Replies are parsed into `reasoning_content`, `content` and `tool_calls`
(finish_reason "tool_calls"), streamed as the matching deltas. tool_choice "required" or a named function, and
response_format json_object / json_schema, constrain decoding with a grammar (k2jax.chat.grammar): the reply is a
tool call whose arguments are valid under the tool's `parameters` schema (or JSON under the given schema) by
construction; a reasoning block first is allowed unless chat_template_kwargs.thinking is false. tool_choice "auto"
(the default with tools) decodes freely and parses; "none" leaves the tools out of the prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2jax.chat import ChatTemplate, StreamParser, count_tool_calls, encode_chat, render_chat
from k2jax.chat.grammar import GrammarMatcher
from k2jax.chat.parser import THINK_OPEN
from k2jax.serving.limits import ServerLimits
from k2jax.serving.scheduler import (
    Engine,
    EngineStoppedError,
    Event,
    SamplingParams,
    TokenLogprob,
)
from k2jax.tokenizer import IM_END

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI default for /v1/completions
MAX_PROMPTS_PER_REQUEST = 64
MAX_STOP_SEQUENCES = 4  # the OpenAI limit
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error answered with `status` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers


class _ErrorJSON(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote client input, lone surrogates included, which
    cannot be encoded as UTF-8."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True).encode("ascii")


def _error_response(status, message, type_="invalid_request_error", code=None, param=None, headers=None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return _ErrorJSON(status_code=status, content=body, headers=headers)


class _BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before the app sees it. The body is read here
    (to at most max_bytes) and replayed to the app; later receive() calls (disconnect detection) pass through.
    An over-long body is read on and dropped up to `drain_factor` x max_bytes before answering, so that the
    client, still sending, reads the 413 instead of a connection reset."""

    def __init__(self, app, max_bytes: int, drain_factor: int = 16):
        self.app, self.max_bytes, self.drain_bytes = app, max_bytes, drain_factor * max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            declared = int(declared) if declared is not None else None
        except ValueError:
            return await _error_response(400, "invalid Content-Length header")(scope, receive, send)
        too_big = _error_response(413, f"the request body is larger than this server's limit of {self.max_bytes} "
                                       f"bytes", code="request_too_large")
        if declared is not None and declared > self.drain_bytes:
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                if size > self.drain_bytes:
                    break
                continue
            chunks.append(body)
        if size > self.max_bytes:
            return await too_big(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


# ---- request bodies -----------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False  # end the stream with a chunk holding the usage (and no choices), as OpenAI


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # unset or null: COMPLETIONS_DEFAULT_MAX_TOKENS, as OpenAI
    logprobs: int | None = None
    echo: bool = False
    # vLLM's extension: each choice also carries its generated token ids, so a token-level client (an agent
    # appending tool results) sends back exactly what was generated and the prefix cache hits. Not the prompt's
    # ids (vLLM's prompt_token_ids): the client has them, and encoding 29k ids into JSON took ~100 ms here.
    return_token_ids: bool = False


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
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True
    response_format: dict | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    max_reasoning_tokens: int | None = None  # k2jax: bounds the reasoning before a constrained reply


# ---- the app ------------------------------------------------------------------------------------------------------
def create_app(engine: Engine, tokenizer, model_name: str, limits: ServerLimits | None = None,
               chat_template: ChatTemplate | str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name` (requests naming another model get 404), within
    `limits` (default `ServerLimits()`; the object is read per request, so changing a field takes effect at
    once). chat_template: the checkpoint's template (a ChatTemplate or Jinja source), None for the built-in Kimi
    K2 format. The engine's background thread is started with the app and stopped with it."""
    if isinstance(chat_template, str):
        chat_template = ChatTemplate(chat_template, name="chat_template")
    limits = limits if limits is not None else ServerLimits()
    limits.validate()
    prompt_chars = max_prompt_chars(tokenizer, engine.max_len)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="k2jax", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return _error_response(e.status, e.message, e.type, e.code, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        parts = []
        for err in e.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error_response(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        return _error_response(e.status_code, str(e.detail), headers=e.headers)

    @app.get("/health")
    async def health():
        body = {"status": "ok", "model": model_name, "active": engine.num_active, "waiting": engine.num_waiting}
        if not engine.running:
            body.update(status="error", error=engine.error or "the engine is not running")
            return JSONResponse(status_code=503, content=body)
        return body

    @app.get("/v1/stats")
    async def stats():
        st = engine.stats
        return {"prefix_cache": engine.prefix_stats(), "page_pool": engine.pool_stats(),
                "active": engine.num_active, "waiting": engine.num_waiting,
                "prefill_tokens": st["prefill_tokens"], "decode_tokens": st["decode_tokens"],
                "finished": dict(st["finished"])}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "k2jax", "max_model_len": engine.max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        _check_model(body.model, model_name)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        params = _params(body, body.max_tokens, body.logprobs, [])
        texts = _completion_prompts(body.prompt, prompt_chars)
        _check_capacity(engine, limits, len(texts))
        prompts = await asyncio.to_thread(_encode_all, tokenizer, texts)
        default = body.max_tokens is None
        run = _Run(engine, prompts, [_with_max_tokens(params, ids, engine, COMPLETIONS_DEFAULT_MAX_TOKENS, default)
                                     for ids in prompts], limits)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return _sse(_completion_chunks(run, rid, model_name, tokenizer, _include_usage(body)))
        if not await run.wait_unless_disconnected(request):
            return _client_gone()
        choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason,
                    "logprobs": _completion_logprobs(r.logprobs, tokenizer) if body.logprobs is not None else None}
                   for i, r in enumerate(run.reqs)]
        if body.return_token_ids:
            for c, r in zip(choices, run.reqs):
                c["token_ids"] = list(r.token_ids)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": run.usage()}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        _check_model(body.model, model_name)
        top = body.top_logprobs if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.logprobs and top is None:
            top = 0
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = _params(body, max_tokens, top, _end_of_turn(tokenizer))
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        kwargs = _chat_kwargs(body)
        _check_capacity(engine, limits, 1)
        prompt_tools = body.tools if body.tool_choice != "none" else None
        ids = await asyncio.to_thread(_chat_ids, tokenizer, messages, prompt_tools, chat_template, kwargs,
                                      prompt_chars)
        reasoning_open = tokenizer.decode(ids[-len(THINK_OPEN):]).endswith(THINK_OPEN)
        grammar = await asyncio.to_thread(_chat_grammar, engine, body, kwargs, reasoning_open)
        run = _Run(engine, [ids], [_with_max_tokens(params, ids, engine, limits.default_max_tokens,
                                                    max_tokens is None)], limits, grammars=[grammar])
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        # The reply's call ids continue the conversation's count (the model's own IDX may repeat one).
        first_call = count_tool_calls(messages)
        if body.stream:
            return _sse(_chat_chunks(run, rid, model_name, tokenizer, StreamParser(reasoning_open, first_call),
                                     _include_usage(body)))
        if not await run.wait_unless_disconnected(request):
            return _client_gone()
        r = run.reqs[0]
        parser = StreamParser(reasoning_open, first_call)
        parser.feed(r.text)
        parser.finish()
        message = {"role": "assistant", "content": parser.content or None}
        if parser.reasoning_content:
            message["reasoning_content"] = parser.reasoning_content
        if parser.tool_calls:
            message["tool_calls"] = parser.tool_calls
        elif message["content"] is None:
            message["content"] = ""
        choice = {"index": 0, "message": message, "finish_reason": parser.finish_reason(r.finish_reason),
                  "logprobs": {"content": _chat_logprobs(r.logprobs, tokenizer)} if body.logprobs else None}
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": [choice], "usage": run.usage()}

    return app


# ---- helpers: validation ------------------------------------------------------------------------------------------
def _check_model(requested, served):
    if requested is not None and requested != served:
        raise APIError(404, f"the model {requested!r} does not exist; this server serves {served!r}",
                       code="model_not_found", param="model")


def max_prompt_chars(tokenizer, max_len: int) -> int:
    """Characters of prompt text above which the prompt cannot fit a context of `max_len` tokens, whatever it
    says: (max_len - 1) x (the most characters one token stands for, + 1 for decoders that drop a leading space
    marker). One pass over the vocabulary at start-up; a cheap bound checked before tokenizing."""
    def chars(i):
        try:
            return len(tokenizer.decode([i]))
        except (ValueError, KeyError):  # an id with no token (a gap in a vocabulary) stands for nothing
            return 0

    longest = max(chars(i) for i in range(tokenizer.vocab_size))
    return (max_len - 1) * (longest + 1)


def _completion_prompts(prompt, prompt_chars: int) -> list[str | list[int]]:
    """The prompts of a completion request (text or token ids), each cheaply checked for length."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    elif all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if len(prompts) > MAX_PROMPTS_PER_REQUEST:
        raise APIError(400, f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(prompts)}",
                       param="prompt")
    for p in prompts:
        if isinstance(p, str) and len(p) > prompt_chars:
            raise APIError(400, f"the prompt has {len(p)} characters, more than the context can hold (at most "
                                f"{prompt_chars} characters with this tokenizer)", param="prompt")
    return prompts


def _encode_all(tokenizer, prompts) -> list[list[int]]:
    """Token ids of each prompt (worker thread); a text the tokenizer rejects (e.g. a lone surrogate) is a 400."""
    try:
        return [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    except ValueError as e:  # UnicodeEncodeError is one
        raise APIError(400, f"prompt: {e}", param="prompt") from None


def _chat_kwargs(body: ChatBody) -> dict:
    """chat_template_kwargs, checked: names are identifiers, none replaces a variable the server sets."""
    kwargs = dict(body.chat_template_kwargs or {})
    for key in kwargs:
        if not key.isidentifier() or key in ("messages", "tools", "add_generation_prompt", "documents", "template"):
            raise APIError(400, f"chat_template_kwargs: {key!r} cannot be set (a template variable name other than "
                                f"messages, tools, documents, add_generation_prompt)", param="chat_template_kwargs")
    if kwargs.get("thinking") not in (None, True, False):
        raise APIError(400, f"chat_template_kwargs.thinking={kwargs['thinking']!r} is invalid: true, false or null",
                       param="chat_template_kwargs")
    return kwargs


def _chat_ids(tokenizer, messages, tools, template, kwargs, prompt_chars: int) -> list[int]:
    """Token ids of the chat (worker thread), after a cheap bound on the text's length."""
    for i, m in enumerate(messages):
        if m["role"] not in CHAT_ROLES:
            raise APIError(400, f"messages[{i}]: role {m['role']!r} is invalid: one of {list(CHAT_ROLES)}",
                           param="messages")
    try:
        chars = len(render_chat(messages, tools, template=template, **kwargs))
        if chars > prompt_chars:
            raise APIError(400, f"the messages have {chars} characters, more than the context can hold (at most "
                                f"{prompt_chars} characters with this tokenizer)", param="messages")
        return encode_chat(tokenizer, messages, tools, template=template, **kwargs)
    except (ValueError, KeyError, TypeError) as e:
        raise APIError(400, f"messages: {e}", param="messages") from None


def _chat_grammar(engine: Engine, body: ChatBody, kwargs: dict, reasoning_open: bool) -> GrammarMatcher | None:
    """The matcher of the grammar a chat reply must follow (None: free decoding), from tools / tool_choice /
    response_format (worker thread: building one compiles the grammar); every declared tool's schema is checked
    even when decoding stays free. 400 names the field at fault."""
    choice = body.tool_choice
    if choice is not None and not body.tools and choice not in ("none", "auto"):
        raise APIError(400, f"tool_choice={choice!r} needs 'tools'", param="tool_choice")
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        raise APIError(400, f"tool_choice={choice!r} is invalid: 'none', 'auto', 'required' or "
                            f"{{'type': 'function', 'function': {{'name': ...}}}}", param="tool_choice")
    budget = body.max_reasoning_tokens
    if budget is not None and budget < 0:
        raise APIError(400, f"max_reasoning_tokens={budget} must be >= 0", param="max_reasoning_tokens")
    if not body.tools and body.response_format is None:
        return _no_grammar(budget)
    thinking = "open" if reasoning_open else "none" if kwargs.get("thinking") is False else "optional"
    try:
        gt = engine.grammar_tokenizer
    except ValueError as e:
        if body.tools or body.response_format:
            raise APIError(400, f"tools / response_format: {e}", param="tools") from None
        return None
    if body.tools:
        try:
            gt.grammar(tools=body.tools, tool_choice="required", thinking="none")
        except ValueError as e:
            raise APIError(400, f"tools: {e}", param="tools") from None
    try:
        grammar = gt.grammar(tools=body.tools if choice != "none" else None,
                             tool_choice=choice if choice != "none" else None, response_format=body.response_format,
                             parallel_tool_calls=body.parallel_tool_calls, thinking=thinking,
                             max_reasoning_tokens=budget)
        return gt.matcher(grammar) if grammar is not None else _no_grammar(budget)
    except ValueError as e:
        msg = str(e)
        param = ("max_reasoning_tokens" if "max_reasoning_tokens" in msg else
                 "response_format" if "response_format" in msg else "tool_choice")
        raise APIError(400, msg if msg.startswith(param) else f"{param}: {msg}", param=param) from None


def _no_grammar(max_reasoning_tokens: int | None) -> None:
    """Free decoding: None, unless the request bounds its reasoning, which only a constrained reply can do."""
    if max_reasoning_tokens is not None:
        raise APIError(400, "max_reasoning_tokens bounds the reasoning of a constrained reply (tool_choice "
                            "'required' or a named function, or a json response_format); this request decodes "
                            "freely", param="max_reasoning_tokens")
    return None


def _check_capacity(engine: Engine, limits: ServerLimits, n: int) -> None:
    """429 if `n` more requests would queue more than limits.max_waiting requests behind the busy slots."""
    if engine.error is not None:
        raise APIError(503, f"the server cannot take requests: {engine.error}", type_="server_error")
    queued = max(0, engine.num_unfinished + n - engine.num_slots)
    if queued > limits.max_waiting:
        raise APIError(429, f"the server is busy ({engine.num_slots} slots in use and {limits.max_waiting} requests "
                            f"waiting, the most it queues); retry in {limits.retry_after_s} s", type_="requests",
                       code="rate_limit_exceeded", headers={"Retry-After": str(limits.retry_after_s)})


def _end_of_turn(tokenizer) -> list[int]:
    try:
        return [tokenizer.special_id(IM_END)]
    except (ValueError, AttributeError):
        return []


def _params(body: _Common, max_tokens, logprobs, extra_stop_ids) -> SamplingParams:
    """The request's SamplingParams, validated (400 naming the field)."""
    if body.n != 1:
        raise APIError(400, f"n={body.n} is not supported: only n=1", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stop)}", param="stop")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    p = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                       seed=body.seed, stop=stop, stop_token_ids=list(body.stop_token_ids or []) + extra_stop_ids,
                       ignore_eos=body.ignore_eos, logprobs=logprobs)
    try:
        p.validate()
    except ValueError as e:
        raise APIError(400, str(e), param=str(e).split("=", 1)[0]) from None
    return p


def _with_max_tokens(params: SamplingParams, ids, engine: Engine, default: int, use_default: bool):
    """params with max_tokens set: `default` when the request named none, cut to the room the prompt leaves."""
    if not use_default:
        return params
    return dataclasses.replace(params, max_tokens=max(1, min(default, engine.max_len - len(ids))))


# ---- helpers: running requests ------------------------------------------------------------------------------------
class _Run:
    """The engine requests of one HTTP request, with their events funnelled into one asyncio queue as
    (prompt index, Event), and its deadline (limits.request_timeout_s from now)."""

    def __init__(self, engine: Engine, prompts, params: list[SamplingParams], limits: ServerLimits,
                 grammars: list[GrammarMatcher | None] | None = None):
        loop = asyncio.get_running_loop()
        self.engine, self.queue, self.limits = engine, asyncio.Queue(), limits
        self.deadline = loop.time() + limits.request_timeout_s
        self.reqs = []
        # No await from the capacity check to the last submit: requests from other clients (all submitted on
        # this event loop) cannot slip in between, so the queue bound holds exactly.
        try:
            _check_capacity(engine, limits, len(prompts))
            for i, (ids, p) in enumerate(zip(prompts, params)):
                self.reqs.append(engine.submit(ids, p, callback=self._forward(loop, i),
                                               grammar=grammars[i] if grammars else None))
        except ValueError as e:
            self.abort()
            raise APIError(400, str(e), param="prompt" if "prompt" in str(e) else "max_tokens") from None
        except EngineStoppedError as e:
            self.abort()
            raise APIError(503, f"the server cannot take requests: {e}", type_="server_error") from None
        except APIError:
            self.abort()
            raise

    def _forward(self, loop, index: int):
        """An engine callback (engine thread) that queues (index, event) on the event loop's queue."""
        return lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, (index, ev))

    async def events(self):
        """Yield (index, Event) until every request finished; raises APIError on an engine error (500, or 503
        when the engine died) or when the deadline passes (504, the requests aborted)."""
        loop = asyncio.get_running_loop()
        left = len(self.reqs)
        while left:
            try:
                i, ev = await asyncio.wait_for(self.queue.get(), max(0.0, self.deadline - loop.time()))
            except TimeoutError:
                self.abort()
                raise APIError(504, f"the request did not finish within this server's limit of "
                                    f"{self.limits.request_timeout_s:g} s", type_="server_error",
                               code="timeout") from None
            if ev.finish_reason == "error":
                status = 503 if self.engine.error is not None else 500
                raise APIError(status, f"generation failed: {ev.error}", type_="server_error")
            left -= ev.finished
            yield i, ev

    async def wait_or_abort(self):
        """Wait for every request; if this is cancelled or fails, abort the ones still running."""
        try:
            async for _ in self.events():
                pass
        finally:
            self.abort()

    async def wait_unless_disconnected(self, request: Request) -> bool:
        """Wait for every request while watching the connection; False (the requests aborted) if the client
        went away first. Raises what `events` raises."""
        work = asyncio.ensure_future(self.wait_or_abort())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this handler was cancelled (server shutdown)
            work.cancel()
            self.abort()
            raise
        finally:
            gone.cancel()
        if work in done:
            work.result()
            return True
        work.cancel()
        self.abort()
        with contextlib.suppress(asyncio.CancelledError, APIError):
            await work
        return False

    def abort(self):
        for r in self.reqs:
            if not r.finished:
                self.engine.abort(r)

    def usage(self) -> dict:
        p = sum(len(r.prompt_ids) for r in self.reqs)
        c = sum(len(r.token_ids) for r in self.reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in self.reqs)}}


async def _disconnected(request: Request) -> None:
    """Return once the client has disconnected (the body is read already, so receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _client_gone():
    # Nobody reads this: 499 (nginx's "client closed request") only marks it in logs.
    return Response(status_code=499)


def _sse(gen):
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _include_usage(body: _Common) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


async def _stream(run: _Run, make_chunks, usage_chunk=None):
    """Yield SSE lines from make_chunks(index, Event), then usage_chunk(usage) if given; abort the engine
    requests if the client goes away."""
    try:
        async for i, ev in run.events():
            for chunk in make_chunks(i, ev):
                yield _data(chunk)
        if usage_chunk is not None:
            yield _data(usage_chunk(run.usage()))
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield _data({"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}})
    finally:
        run.abort()


def _usage_chunk(rid, object_, model_name):
    """The last chunk of a stream asked for with stream_options.include_usage: no choices, the usage."""
    return lambda usage: {"id": rid, "object": object_, "created": int(time.time()), "model": model_name,
                          "choices": [], "usage": usage}


def _completion_chunks(run, rid, model_name, tokenizer, include_usage=False):
    def make(i, ev: Event):
        if not ev.text and not ev.finished and not ev.logprobs:
            return []
        lp = _completion_logprobs(ev.logprobs, tokenizer) if ev.logprobs else None
        return [{"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                 "choices": [{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}]}]

    return _stream(run, make, _usage_chunk(rid, "text_completion", model_name) if include_usage else None)


def _chat_chunks(run, rid, model_name, tokenizer, parser: StreamParser, include_usage=False):
    """Chunks of a streamed chat reply: the role first, then the parser's reasoning_content / content /
    tool_calls deltas (a call's name and id first, its arguments in pieces), then the finish_reason (and the usage chunk when asked)."""
    started = [False]

    def make(i, ev: Event):
        out = []
        base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name}
        if not started[0]:
            started[0] = True
            out.append({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        lp = {"content": _chat_logprobs(ev.logprobs, tokenizer)} if ev.logprobs else None
        deltas = parser.feed(ev.text) + (parser.finish() if ev.finished else [])
        if lp and not deltas:
            deltas = [{"content": ""}]
        for k, delta in enumerate(deltas):
            out.append({**base, "choices": [{"index": 0, "delta": delta, "logprobs": lp if k == 0 else None,
                                             "finish_reason": None}]})
        if ev.finished:
            out.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                             "finish_reason": parser.finish_reason(ev.finish_reason)}]})
        return out

    return _stream(run, make, _usage_chunk(rid, "chat.completion.chunk", model_name) if include_usage else None)


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
def make_server(engine: Engine, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                limits: ServerLimits | None = None, chat_template: ChatTemplate | str | None = None):
    """A `uvicorn.Server` for the app (call `.run()` to block, or run it in a thread; `.should_exit = True` stops
    it). chat_template: as in create_app."""
    import uvicorn  # noqa: PLC0415 (the serve extra; only make_server needs it)

    app = create_app(engine, tokenizer, model_name, limits, chat_template)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))


@contextlib.contextmanager
def serve_in_thread(engine: Engine, tokenizer, model_name: str, limits: ServerLimits | None = None,
                    chat_template: ChatTemplate | str | None = None, *, host: str = "127.0.0.1",
                    start_timeout_s: float = 60.0):
    """Serve `engine` from a background thread while the context is open (tests, benchmarks, notebooks); yields
    the base URL, "http://HOST:PORT". The port is a free one, bound here and handed to uvicorn, so no other
    process can take it in between. Raises RuntimeError if the server has not started after start_timeout_s (or
    its thread died); on exit asks the server to stop and waits up to 30 s (the app's lifespan stops the engine's
    thread). limits, chat_template: as in create_app."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = make_server(engine, tokenizer, model_name, host, port, limits, chat_template)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="k2jax-http")
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"serve_in_thread: the server on {host}:{port} did not start within "
                                   f"{start_timeout_s} s" + ("" if thread.is_alive() else " (its thread exited)"))
            time.sleep(0.02)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
