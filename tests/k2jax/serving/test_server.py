"""The OpenAI-compatible HTTP API (in-process uvicorn on 127.0.0.1) and the serve.py CLI: answers equal the engine's,
bad requests get their 4xx, limits hold, disconnects abort, and no request can fail another."""

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from k2jax.serving.limits import ServerLimits  # noqa: E402
from k2jax.serving.scheduler import SamplingParams  # noqa: E402
from k2jax.serving.server import serve_in_thread  # noqa: E402
from k2jax.tokenizer import ByteTokenizer  # noqa: E402
from tests.k2jax.serving.test_engine import MAX_LEN, tiny_engine  # noqa: E402
from tests.k2jax.serving.test_prefix_engine import engine_pair  # noqa: E402

MODEL = "tiny-test"
TIMEOUT = 120.0
# The served app reads these per request: a test may change a field (monkeypatch) for its own duration.
LIMITS = ServerLimits(max_body_bytes=64 * 1024, max_waiting=64, request_timeout_s=TIMEOUT, default_max_tokens=8)


# A checkpoint-style Jinja chat template without the Kimi default system prompt, which would not fit the 32-token
# context of these tests.
COMPACT_TEMPLATE = ("{% for m in messages %}{% if m.role == 'user' %}<|im_user|>{% elif m.role == 'assistant' %}"
                    "<|im_assistant|>{% else %}<|im_system|>{% endif %}{{ m.name or m.role }}<|im_middle|>"
                    "{{ m.content or '' }}<|im_end|>{% endfor %}"
                    "{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}")


@contextlib.contextmanager
def _serve(engine, limits, chat_template=COMPACT_TEMPLATE, tokenizer=None):
    """Run the app over `engine` in a uvicorn thread on 127.0.0.1; yields an httpx client for it."""
    with serve_in_thread(engine, tokenizer or ByteTokenizer(), MODEL, limits, chat_template) as url:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
            yield client


@pytest.fixture(scope="module")
def served():
    engine = tiny_engine()
    engine.warmup()
    with _serve(engine, LIMITS) as client:
        yield engine, client


@pytest.fixture
def slow_decode(served, monkeypatch):
    """Every decode step of the served engine takes at least 20 ms more, so that a request of ~25 tokens is
    still running when a test disconnects or times it out."""
    engine, _ = served
    real = engine.runner.decode

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "decode", slow)


def _finished(engine, reason: str) -> int:
    return engine.stats["finished"].get(reason, 0)


def _wait_idle(engine, seconds: float = 30.0):
    """Wait until the engine holds no request (slots free, nothing queued)."""
    deadline = time.monotonic() + seconds
    while engine.num_unfinished or engine.num_active:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.01)


def _sse_events(response) -> list:
    """The data payloads of an SSE response, '[DONE]' last."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_and_models(served):
    _, client = served
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_completion_equals_engine_output_with_and_without_streaming(served):
    engine, client = served
    tok = ByteTokenizer()
    ref = engine.generate([tok.encode("hello")], SamplingParams(max_tokens=6, ignore_eos=True), timeout=TIMEOUT)[0]
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    choice = out["choices"][0]
    assert out["object"] == "text_completion" and choice["text"] == ref.text and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11,
                            "prompt_tokens_details": {"cached_tokens": 0}}
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == 6 and all(len(t) <= 2 for t in lp["top_logprobs"])
    assert "token_ids" not in choice
    ids = client.post("/v1/completions", json={**body, "return_token_ids": True}).json()["choices"][0]
    assert ids["token_ids"] == ref.token_ids and ids["text"] == ref.text
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == ref.text
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_cached_tokens_in_usage_streamed_usage_and_the_stats_endpoint():
    """With the prefix cache on: a prompt sent again resumes from its cached prefix (the second request stops
    its prefill where it leaves the cached path, so the third resumes there); usage reports the cached tokens,
    also in the last chunk of a stream with stream_options.include_usage; GET /v1/stats shows the hits."""
    engine, _ = engine_pair("float32")
    body = {"model": MODEL, "prompt": "the same system prompt", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    n = len("the same system prompt")
    engine.start()
    try:
        with _serve(engine, LIMITS) as client:
            before = client.get("/v1/stats").json()["prefix_cache"]
            outs = [client.post("/v1/completions", json=body).json() for _ in range(3)]
            assert [o["usage"]["prompt_tokens_details"]["cached_tokens"] for o in outs] == [0, 0, n - 1]
            assert len({o["choices"][0]["text"] for o in outs}) == 1
            with client.stream("POST", "/v1/completions",
                               json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
                events = _sse_events(r)
            assert events[-1] == "[DONE]" and events[-2]["choices"] == []
            assert events[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] == n - 1
            assert "".join(e["choices"][0]["text"] for e in events[:-2]) == outs[0]["choices"][0]["text"]
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                    "temperature": 0}
            usage = client.post("/v1/chat/completions", json=chat).json()["usage"]
            assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
            _wait_idle(engine)  # a reply can come before its request's pages reach the prefix cache
            stats = client.get("/v1/stats").json()
            after, pool = stats["prefix_cache"], stats["page_pool"]
            assert after["hits"] - before["hits"] == 2 and after["queries"] - before["queries"] == 5
            assert 0 < after["bytes_in_use"] <= after["budget_bytes"]
            # idle: only the cached prefixes hold pages
            assert pool["pages_slots"] == 0 and pool["pages_tree"] == after["pages_in_use"] > 0
            assert pool["pages_free"] + pool["pages_tree"] == pool["pages_total"]
            assert pool["bytes_total"] == pool["pages_total"] * pool["page_bytes"]
    finally:
        engine.shutdown()


def test_chat_completion_with_and_without_streaming(served):
    _, client = served
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
            "logprobs": True, "top_logprobs": 1}
    out = client.post("/v1/chat/completions", json=body).json()
    choice = out["choices"][0]
    assert out["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    assert len(choice["logprobs"]["content"]) == out["usage"]["completion_tokens"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = _sse_events(r)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == choice["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_64_concurrent_clients_all_complete(served):
    _, client = served
    base = str(client.base_url)

    def one(i):
        body = {"model": MODEL, "prompt": f"client {i}", "max_tokens": 4, "ignore_eos": True,
                "temperature": 0.0 if i % 2 else 0.9, "seed": i}
        with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
            if i % 4 == 3:
                with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    events = _sse_events(r)
                return r.status_code, events[-2]["choices"][0]["finish_reason"]
            r = c.post("/v1/completions", json=body)
            return r.status_code, r.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    assert all(code == 200 for code, _ in results)
    assert all(x == ("length" if i % 4 == 3 else 4) for i, (_, x) in enumerate(results))
    assert client.get("/health").json()["active"] == 0


@pytest.mark.parametrize("path, body, status, match", [
    ("/v1/completions", {"model": MODEL, "prompt": "x" * MAX_LEN}, 400, "context"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": ', 400, "JSON"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2}, 400, "n=2"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": "nope", "messages": []}, 404, "does not exist"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "a \\ud800 b"}', 400, "surrogates not allowed"),
    ("/v1/chat/completions", b'{"model": "tiny-test", "messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "surrogates not allowed"),
    ("/v1/completions", b'{"model": "\\ud800", "prompt": "hi"}', 404, "does not exist"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 10_000}, 400, "characters"),
    ("/v1/completions", {"model": MODEL, "prompt": [9] * 5000}, 400, "context"),
    ("/v1/completions", {"model": MODEL, "prompt": [9, 2 ** 40]}, 400, "vocab_size"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 70_000}, 413, "larger than"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_k": -1}, 400, "top_k"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop_token_ids": [-5]}, 400, "stop_token_ids"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/nothing", {}, 404, "Not Found"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(served, path, body, status, match):
    _, client = served
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert match in r.json()["error"]["message"]
    assert r.content.isascii()  # error bodies escape what they quote: a lone surrogate cannot break them
    ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_a_chunked_body_over_the_limit_gets_413(served):
    """Without a Content-Length the body is counted as it arrives."""
    _, client = served
    body = json.dumps({"model": MODEL, "prompt": "x" * 70_000}).encode()
    chunks = (body[i:i + 8192] for i in range(0, len(body), 8192))
    r = client.post("/v1/completions", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]


def test_chat_without_max_tokens_gets_the_server_default(served):
    """A chat request that names no max_tokens cannot hold a slot for the whole context: it gets
    default_max_tokens (8 here), or the room the prompt leaves when that is less."""
    _, client = served
    base = {"model": MODEL, "temperature": 0, "ignore_eos": True}
    short = client.post("/v1/chat/completions", json={**base, "messages": [{"role": "user", "content": "hi"}]})
    assert short.json()["usage"]["completion_tokens"] == LIMITS.default_max_tokens
    assert short.json()["choices"][0]["finish_reason"] == "length"
    long = client.post("/v1/chat/completions", json={**base, "messages": [{"role": "user", "content": "y" * 8}]})
    usage = long.json()["usage"]
    assert usage["completion_tokens"] == MAX_LEN - usage["prompt_tokens"] < LIMITS.default_max_tokens


def test_a_full_queue_gets_429_with_retry_after(served, slow_decode, monkeypatch):
    engine, client = served
    monkeypatch.setattr(LIMITS, "max_waiting", 0)
    body = {"model": MODEL, "prompt": "busy", "max_tokens": 25, "ignore_eos": True, "temperature": 0}
    with contextlib.ExitStack() as streams:
        for _ in range(engine.num_slots):  # every slot taken, nothing may wait
            r = streams.enter_context(client.stream("POST", "/v1/completions", json={**body, "stream": True}))
            assert r.status_code == 200
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == str(LIMITS.retry_after_s)
        err = r.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and "busy" in err["message"]
    _wait_idle(engine)  # the streams were closed: their requests were aborted
    monkeypatch.setattr(LIMITS, "max_waiting", 64)
    assert client.post("/v1/completions", json={**body, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_over_the_time_limit_is_aborted(served, slow_decode, monkeypatch, stream):
    engine, client = served
    monkeypatch.setattr(LIMITS, "request_timeout_s", 0.2)
    aborted = _finished(engine, "abort")
    body = {"model": MODEL, "prompt": "slow", "max_tokens": 25, "ignore_eos": True, "stream": stream}
    if stream:
        with client.stream("POST", "/v1/completions", json=body) as r:
            events = _sse_events(r)
        assert r.status_code == 200 and "within this server's limit of 0.2 s" in events[-1]["error"]["message"]
    else:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    _wait_idle(engine)
    assert _finished(engine, "abort") == aborted + 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_has_its_request_aborted(served, slow_decode, stream):
    """The request ends with reason 'abort' long before its 25 tokens (>= 0.5 s here), freeing its slot."""
    engine, client = served
    aborted, lengths = _finished(engine, "abort"), _finished(engine, "length")
    body = {"model": MODEL, "prompt": "bye", "max_tokens": 25, "ignore_eos": True, "stream": stream}
    if stream:
        with client.stream("POST", "/v1/completions", json=body) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
    else:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            client.post("/v1/completions", json=body, timeout=0.2)
    _wait_idle(engine)
    assert (_finished(engine, "abort"), _finished(engine, "length")) == (aborted + 1, lengths)


def test_a_dead_engine_makes_health_503_and_fails_requests_instead_of_hanging():
    engine = tiny_engine()  # never steps for real: nothing is compiled

    def step():
        raise SystemExit("injected")  # a BaseException, which ends the engine thread

    engine.step = step
    with _serve(engine, ServerLimits()) as client:
        assert client.get("/health").status_code == 200
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 503 and "the engine stopped: SystemExit: injected" in r.json()["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503 and "injected" in health.json()["error"]
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "stream": True})
        assert r.status_code == 503


def test_32_concurrent_clients_good_and_bad_requests(served, slow_decode):
    """32 clients at once on 4 slots: good requests (completions and chat, streamed or not, greedy or seeded, one
    with a top_k far beyond the vocabulary) each get exactly the text they get alone; each bad one (a huge body,
    over-long prompts, malformed JSON, an unknown model, a negative top_k, a lone surrogate) gets its 4xx; clients
    that disconnect mid-stream get their requests aborted; the server is healthy and idle at the end."""
    engine, client = served
    base = str(client.base_url)
    chat_msgs = lambda i: [{"role": "user", "content": f"q{i}"}]  # noqa: E731
    good = []
    for i in range(16):
        stream = i % 2 == 1
        if i % 4 < 2:
            good.append(("/v1/completions", {"model": MODEL, "prompt": f"good {i}", "max_tokens": 3 + i % 5,
                                             "temperature": 0, "ignore_eos": True, "stream": stream}))
        else:
            good.append(("/v1/chat/completions", {"model": MODEL, "messages": chat_msgs(i), "max_tokens": 4,
                                                  "temperature": 0.8, "seed": i, "stream": stream}))
    good.append(("/v1/completions", {"model": MODEL, "prompt": "k", "top_k": 2 ** 31, "temperature": 1.0,
                                     "seed": 3, "max_tokens": 5, "ignore_eos": True}))
    good.append(("/v1/completions", {"model": MODEL, "prompt": "k", "top_k": 10 ** 30, "temperature": 1.0,
                                     "seed": 3, "max_tokens": 5, "ignore_eos": True, "stream": True}))
    huge = json.dumps({"model": MODEL, "prompt": "x" * (LIMITS.max_body_bytes + 1)}).encode()
    bad = [("/v1/completions", huge, 413),
           ("/v1/completions", {"model": MODEL, "prompt": "x" * 40}, 400),  # over the context once tokenized
           ("/v1/completions", {"model": MODEL, "prompt": "x" * 5000}, 400),  # over it by the early bound
           ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 40}]}, 400),
           ("/v1/completions", b'{"model": "tiny-test", "prompt": "unfinished', 400),
           ("/v1/chat/completions", b'{"messages": [}', 400),
           ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404),
           ("/v1/chat/completions", {"model": "other", "messages": chat_msgs(0)}, 404),
           ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_k": -2}, 400),
           ("/v1/completions", b'{"model": "tiny-test", "prompt": "\\ud83d"}', 400)]
    disconnecting = 4
    disconnect_body = {"model": MODEL, "prompt": "leaving", "max_tokens": 25, "ignore_eos": True, "stream": True}
    assert len(good) + len(bad) + disconnecting == 32

    def send(c, path, body):
        """(status, text) of one request; text joined from the events when streamed."""
        if isinstance(body, bytes):
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            return r.status_code, None
        if body.get("stream"):
            with c.stream("POST", path, json=body) as r:
                events = _sse_events(r) if r.status_code == 200 else []
            key = "text" if path == "/v1/completions" else "content"
            text = "".join(e["choices"][0].get("delta", e["choices"][0]).get(key) or "" for e in events[:-1])
            return r.status_code, text
        r = c.post(path, json=body)
        if r.status_code != 200:
            return r.status_code, None
        choice = r.json()["choices"][0]
        return 200, choice["text"] if path == "/v1/completions" else choice["message"]["content"]

    alone = [send(client, path, body) for path, body in good]
    assert all(code == 200 for code, _ in alone)
    aborted = _finished(engine, "abort")

    def one(k):
        with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
            if k < len(good):
                return send(c, *good[k])
            if k < len(good) + len(bad):
                path, body, _ = bad[k - len(good)]
                return send(c, path, body)
            with c.stream("POST", "/v1/completions", json=disconnect_body) as r:
                next(line for line in r.iter_lines() if line.startswith("data: "))
            return r.status_code, None

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert results[:len(good)] == alone
    assert [code for code, _ in results[len(good):len(good) + len(bad)]] == [status for *_, status in bad]
    assert [code for code, _ in results[len(good) + len(bad):]] == [200] * disconnecting
    _wait_idle(engine)
    assert _finished(engine, "abort") == aborted + disconnecting
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["active"] == 0 and health.json()["waiting"] == 0


def test_cli_generates_for_prompts_and_a_file(tmp_path, capsys):
    import serve  # noqa: PLC0415 (the serve.py script, not a package module)

    f = tmp_path / "prompts.txt"
    f.write_text("first line\n\nsecond\n")
    # configs/default.yaml has 512 ids, the byte tokenizer 264: served as is, ids >= 264 are never sampled.
    argv = ["--config", "default", "--slots", "4", "--max-len", str(MAX_LEN), "--no-warmup", "--max-tokens", "3",
            "--prefix-cache-gb", "0.001", "--prompt", "hi", "--prompts-file", str(f)]
    assert serve.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.count("=== ") == 3 and "'second' -> [length, 3 tokens" in captured.out
    assert "tok/s" in captured.err and "--- prefix cache: 0 hits / 3 queries" in captured.err
    assert "--- page pool: " in captured.err and " 0 preemptions" in captured.err
    with pytest.raises(SystemExit, match="context"):
        serve.main(argv[:-4] + ["--prompt", "y" * 40])
    with pytest.raises(SystemExit, match="kv_cache_bytes=1073 holds 0 tokens, less than one context"):
        serve.main(argv + ["--kv-cache-gb", "0.000001"])
