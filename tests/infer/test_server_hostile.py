"""The server against hostile input and real clients, over real HTTP on 127.0.0.1: a 10 MB body is refused (413)
while /health stays fast, tokenization runs off the event loop, every error is OpenAI-shaped, a poisoned request
fails alone beside running streams, SIGTERM drains, a dead engine answers 503 and exits non-zero, /metrics,
model aliases, echo with prompt log-probs (equal to transformers), special-token text stays text."""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from dsv2.infer.cli import _default_model_name
from dsv2.infer.engine import Engine, SamplingParams
from test_server import MODEL, Server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from oracle import oracle_from_dsv2  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    s = Server(tiny_checkpoint, names=[MODEL, "alias"])
    yield s
    s.stop()


def _shape(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


class _Pinger:
    """GET /health in a loop from another thread; the slowest answer while the server was busy."""

    def __init__(self, url):
        self.url, self.times, self._stop = url, [], False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(timeout=30) as http:
            while not self._stop:
                t = time.perf_counter()
                assert http.get(self.url + "/health").status_code == 200
                self.times.append(time.perf_counter() - t)
                time.sleep(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self.thread.join()


def test_huge_body_is_413_quickly_and_health_stays_fast(server):
    big = json.dumps({"model": MODEL, "prompt": "x" * 10_000_000}).encode()
    with _Pinger(server.url) as ping, httpx.Client(base_url=server.url, timeout=30) as http:
        t = time.perf_counter()
        err = _shape(http.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)
        took = time.perf_counter() - t

        def chunks():  # no Content-Length: refused once the bytes read pass the limit
            yield b'{"model": "tiny-test", "prompt": "'
            for _ in range(100):
                yield b"y" * 100_000
            yield b'"}'

        err2 = _shape(http.post("/v1/chat/completions", content=chunks()), 413)
        time.sleep(0.1)
    assert "limit" in err["message"] and err2["code"] == "request_too_large"
    assert took < 2.0, took
    # refused from the Content-Length alone: the answer comes before any of the body was sent
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10000000\r\n\r\n")
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head
    assert len(ping.times) >= 3 and max(ping.times) < 0.25, ping.times  # 100 ms nominal; 2 shared cores here


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_tokenization_is_off_the_event_loop(server, route):
    """A 400k-character prompt (or chat message) takes seconds to tokenize here; /health answers meanwhile."""
    text = "def foo(x):\n    return x + 1\n" * 14_000
    body = ({"prompt": text} if route == "completions" else {"messages": [{"role": "user", "content": text}]})
    with _Pinger(server.url) as ping:
        t = time.perf_counter()
        r = httpx.post(f"{server.url}/v1/{route}", json={"model": MODEL, **body}, timeout=60)
        took = time.perf_counter() - t
    assert _shape(r, 400)["code"] == "context_length_exceeded"
    assert took > 0.3 and len(ping.times) >= 5, (took, len(ping.times))
    assert max(ping.times) < 0.25, (took, max(ping.times))


ERRORS = [  # (method, path, body bytes, status, param)
    ("GET", "/v1/nothing", None, 404, None),
    ("DELETE", "/v1/completions", None, 405, None),
    ("GET", "/v1/chat/completions", None, 405, None),
    ("POST", "/v1/completions", b'{"model": "tiny-test", "prompt": "\xff\xfe"}', 400, None),  # invalid UTF-8
    ("POST", "/v1/completions", b'{"model": "tiny-test", "prompt": "a\\ud800b"}', 400, "prompt"),
    ("POST", "/v1/completions", b'{"model": "tiny-test", "prompt": "a", "seed": 18446744073709551616}', 400, "seed"),
    ("POST", "/v1/completions", b'{"model": "tiny-test", "prompt": "a", "top_k": 1180591620717411303424}', 400,
     "top_k"),
    ("POST", "/v1/completions", b'{"model": "tiny-test", "prompt": "a", "logit_bias": {"3": 1}}', 400, "logit_bias"),
    ("POST", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a"}],
                                                 "tools": [{"type": "function"}]}).encode(), 400, "tools"),
    ("POST", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": [
        {"role": "tool", "content": "a", "tool_call_id": "1"}]}).encode(), 400, "messages.0.role"),
    ("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": ["a"] * 200, "n": 2}).encode(), 400, "prompt"),
    ("POST", "/v1/completions", json.dumps({"model": "gpt-4", "prompt": "a"}).encode(), 404, "model"),
]


@pytest.mark.parametrize("method,path,body,status,param", ERRORS)
def test_every_error_is_openai_shaped(server, method, path, body, status, param):
    r = httpx.request(method, server.url + path, content=body, timeout=30)
    assert _shape(r, status)["param"] == param


def test_poisoned_request_fails_alone_beside_running_streams(server, monkeypatch):
    """A request that fails inside the engine's batched step (injected: its sampling raises) answers an error;
    the streams decoding beside it finish with the text they have when running alone."""
    engine = server.engine
    sample = type(engine)._sample

    def poisoned(self, reqs, logits):
        if any(r.params.seed == 666 for r in reqs):
            raise RuntimeError("injected failure")
        return sample(self, reqs, logits)

    monkeypatch.setattr(type(engine), "_sample", poisoned)
    kw = {"model": MODEL, "max_tokens": 40, "temperature": 0.7, "seed": 5, "ignore_eos": True}
    prompts = ["import sys\n", "class A:\n", "for i in x:\n"]

    def stream(p):
        with httpx.stream("POST", server.url + "/v1/completions", json={**kw, "prompt": p, "stream": True},
                          timeout=60) as r:
            return "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                           if line.startswith("data: {"))

    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(stream, p) for p in prompts]
        time.sleep(0.3)
        bad = httpx.post(server.url + "/v1/completions", json={**kw, "prompt": "x = 1", "seed": 666}, timeout=60)
        texts = [f.result() for f in futs]
    err = _shape(bad, 500)
    assert err["type"] == "server_error"
    monkeypatch.undo()
    alone = [httpx.post(server.url + "/v1/completions", json={**kw, "prompt": p}, timeout=60).json()
             ["choices"][0]["text"] for p in prompts]
    assert texts == alone
    assert server.wait_idle()["free_blocks"] == server.health()["total_blocks"]


def test_metrics_and_model_aliases(server):
    ids = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    assert ids == [MODEL, "alias"]
    r = httpx.post(server.url + "/v1/completions", json={"model": "alias", "prompt": "a = ", "max_tokens": 3},
                   timeout=30)
    assert r.status_code == 200 and r.json()["model"] == MODEL
    text = httpx.get(server.url + "/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("dsv2_requests", "dsv2_generation_tokens", "dsv2_request_latency_seconds",
                 "dsv2_time_to_first_token_seconds", "dsv2_waiting_requests", "dsv2_cache_free_blocks",
                 "dsv2_cache_usage", "dsv2_preemptions"):
        assert name in fams, name
    ok = [s for s in fams["dsv2_requests"].samples
          if s.labels.get("endpoint") == "/v1/completions" and s.labels.get("status") == "200"]
    assert ok and ok[0].value >= 1
    assert [s for s in fams["dsv2_generation_tokens"].samples if s.name.endswith("_total")][0].value >= 3
    assert _default_model_name(Path("/nonexistent")) == "dsv2"


def test_echo_prompt_logprobs_equal_transformers(server, tmp_path):
    """What lm-evaluation-harness's local-completions sends for a log-likelihood: echo, logprobs, token ids."""
    hf = oracle_from_dsv2(server.engine.model, tmp_path)
    ids = server.tokenizer.encode("def add(a, b):\n    return a + b")
    for max_tokens in (0, 1):
        body = {"model": MODEL, "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": max_tokens,
                "temperature": 0}
        choice = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # the first token has none
        assert len(lp["token_logprobs"]) == len(ids) + max_tokens
        assert choice["text"].startswith(server.tokenizer.decode(ids, skip_special_tokens=False))
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:len(ids)]), want, atol=1e-4, rtol=1e-4)
        for j, top in enumerate(lp["top_logprobs"][1:len(ids)]):  # logprobs=1: the most likely token
            assert list(top.values()) == pytest.approx([ref[j].max().item()], abs=1e-4)


def test_special_token_text_stays_text(server):
    eos = server.tokenizer.eos_token
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": f"a{eos}b", "echo": True,
                                                          "max_tokens": 0, "logprobs": 0}, timeout=30).json()
    assert r["choices"][0]["text"] == f"a{eos}b"
    assert r["usage"]["prompt_tokens"] == len(server.tokenizer.encode(f"a{eos}b", add_bos=True)) > 4  # not a, eos, b
    chat = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": eos}], "max_tokens": 1}, timeout=30).json()
    plain = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": ""}], "max_tokens": 1}, timeout=30).json()
    assert chat["usage"]["prompt_tokens"] - plain["usage"]["prompt_tokens"] > 1  # many plain tokens, not one id


def _sse(r) -> list:
    return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


@pytest.mark.slow  # about 20 s on the shared 2-core machine
def test_sigterm_drains(server):
    s = Server(None, grace_s=1.5, like=server)
    step = s.engine.step
    # 10 ms a step: both requests are running together when SIGTERM comes, the short one (40 tokens) ends within
    # the grace and the long one outlasts it, on any machine (the tiny model alone decodes 480 tokens in about a
    # second and 6 in milliseconds, so the drain sometimes found nothing running)
    s.engine.step = lambda: time.sleep(0.01) or step()
    try:
        body = {"model": MODEL, "prompt": "while True:", "ignore_eos": True, "temperature": 0, "stream": True}
        results = {}

        def run(name, max_tokens):
            with httpx.stream("POST", s.url + "/v1/completions", json={**body, "max_tokens": max_tokens},
                              timeout=60) as r:
                results[name] = _sse(r)

        threads = [threading.Thread(target=run, args=a) for a in (("short", 40), ("long", 480))]
        for t in threads:
            t.start()
        deadline = time.time() + 20
        while s.health()["running"] < 2 and time.time() < deadline:
            time.sleep(0.02)
        s.server.handle_exit(signal.SIGTERM, None)  # what the signal handler calls
        time.sleep(0.3)
        h = httpx.get(s.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "draining"
        refused = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "a"}, timeout=30)
        err = _shape(refused, 503)  # refused at admission (not admitted and then ended by the drain)
        assert err["type"] == "server_error" and err["code"] == "draining" and refused.headers["retry-after"]
        for t in threads:
            t.join(timeout=30)
        s.thread.join(timeout=30)
        assert not s.thread.is_alive() and s.server.exit_code == 0
        assert results["short"][-1] == "[DONE]" and not any("error" in json.loads(x) for x in results["short"][:-1])
        long = results["long"]
        assert long[-1] == "[DONE]" and "shutting down" in json.loads(long[-2])["error"]["message"]
    finally:
        s.stop()


def test_dead_engine_answers_503_and_exits_nonzero(server):
    s = Server(None, like=server)
    try:
        out = []

        def run():
            with httpx.stream("POST", s.url + "/v1/completions", json={
                    "model": MODEL, "prompt": "x", "max_tokens": 480, "ignore_eos": True, "stream": True},
                    timeout=60) as r:
                out.extend(_sse(r))

        t = threading.Thread(target=run)
        t.start()
        while s.health()["running"] < 1:
            time.sleep(0.02)

        def broken():
            raise SystemExit("injected: the engine thread dies")

        s.engine.stats = broken  # called by the engine thread outside its step's error handling
        s.loop._wake.set()
        deadline = time.time() + 10
        while s.loop.alive and time.time() < deadline:
            time.sleep(0.02)
        assert not s.loop.alive
        t.join(timeout=30)
        assert out[-1] == "[DONE]" and "engine" in json.loads(out[-2])["error"]["message"]
        s.thread.join(timeout=30)
        assert s.server.exit_code == 1
    finally:
        s.stop()


@pytest.mark.slow
def test_dsv2_serve_process_drains_on_sigterm_and_exits_0(tiny_checkpoint):
    """The real process: `dsv2 serve`, a stream in flight, SIGTERM: the stream finishes, the process exits 0."""
    import os
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = Path(sys.executable).parent / "dsv2"
    proc = subprocess.Popen([str(exe), "serve", "--model", str(tiny_checkpoint), "--port", str(port),
                             "--kv-cache-memory", "4MB", "--grace-period", "60"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.5)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "dsv2"  # no _name_or_path: "dsv2"
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json={
                "model": "dsv2", "prompt": "x", "max_tokens": 60, "ignore_eos": True, "stream": True},
                timeout=120) as r:
            for line in r.iter_lines():
                if not lines:
                    os.kill(proc.pid, signal.SIGTERM)
                lines.append(line)
        data = [x for x in lines if x.startswith("data: ")]
        assert data[-1] == "data: [DONE]" and not any('"error"' in x for x in data)
        assert json.loads(data[-2][6:])["choices"][0]["finish_reason"] == "length"  # ran to its end
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
