"""The OpenAI-compatible HTTP API (in-process uvicorn on 127.0.0.1) and the serve.py CLI."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from k2jax.engine import SamplingParams  # noqa: E402
from k2jax.server import make_server  # noqa: E402
from k2jax.tokenizer import ByteTokenizer  # noqa: E402
from tests.k2jax.test_engine import MAX_LEN, tiny_engine  # noqa: E402

MODEL = "tiny-test"
TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    engine = tiny_engine()
    engine.warmup()
    port = _free_port()
    server = make_server(engine, ByteTokenizer(), MODEL, "127.0.0.1", port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as client:
        yield engine, client
    server.should_exit = True
    thread.join(30)


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
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == 6 and all(len(t) <= 2 for t in lp["top_logprobs"])
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == ref.text
    assert events[-2]["choices"][0]["finish_reason"] == "length"


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
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(served, path, body, status, match):
    _, client = served
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert match in r.json()["error"]["message"]
    ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_cli_generates_for_prompts_and_a_file(tmp_path, capsys):
    import serve

    f = tmp_path / "prompts.txt"
    f.write_text("first line\n\nsecond\n")
    argv = ["--config", "tiny", "--override", "vocab_size=264", "--override", "num_hidden_layers=2",
            "--override", "kda_layers=[1]", "--override", "full_attn_layers=[2]", "--slots", "4",
            "--max-len", str(MAX_LEN), "--no-warmup", "--max-tokens", "3", "--prompt", "hi", "--prompts-file", str(f)]
    assert serve.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.count("=== ") == 3 and "'second' -> [length, 3 tokens" in captured.out
    assert "tok/s" in captured.err
    with pytest.raises(SystemExit, match="context"):
        serve.main(argv[:-4] + ["--prompt", "y" * 40])
