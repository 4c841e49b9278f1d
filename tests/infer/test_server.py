"""The OpenAI-compatible server, driven over real HTTP on 127.0.0.1: the official `openai` client (streaming and
not), raw HTTP for bad input, 32 concurrent requests, client disconnects, and 503 on a full queue."""

from __future__ import annotations

import argparse
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from dsv2.infer.cli import load_engine
from dsv2.infer.engine import Engine, EngineLoop, SamplingParams
from dsv2.infer.server import Server as DrainingServer
from dsv2.infer.server import create_app

MODEL = "tiny-test"


class Server:
    """uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, ckpt, names=MODEL, grace_s=30.0, app_kw=None, like: "Server | None" = None, **engine_kw):
        """ckpt: load it (as `dsv2 serve` does); or like=another Server: a fresh engine over its model."""
        if like is not None:
            self.engine = Engine(like.engine.model, num_blocks=like.engine.pool.num_blocks,
                                 eos_token_id=like.tokenizer.eos_id, max_waiting=engine_kw.get("max_waiting", 256),
                                 max_batch_size=engine_kw.get("max_batch_size", 64))
            self.tokenizer, self.template = like.tokenizer, like.template
        else:
            args = argparse.Namespace(model=str(ckpt), tokenizer=None, device="cpu", dtype="float32", fp8=False,
                                      kv_cache_memory="4MB", kv_cache_dtype="auto", block_size=16,
                                      max_batch_size=64, max_model_len=None, compile=False, threads=None,
                                      admission="optimistic")
            for k, v in engine_kw.items():
                setattr(args, k, v)
            self.engine, self.tokenizer, self.template = load_engine(args, max_waiting=engine_kw.get("max_waiting",
                                                                                                     256))
        self.loop = EngineLoop(self.engine).start()
        self.app = create_app(self.loop, self.tokenizer, self.template, names, self.engine.max_model_len,
                              **(app_kw or {}))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = DrainingServer(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"),
                                     self.app.state.bridge, grace_s)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.loop.stop()

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def wait_idle(self, timeout=10.0) -> dict:
        deadline = time.time() + timeout
        while True:
            h = self.health()
            if (h["running"] == 0 and h["waiting"] == 0 and h["free_blocks"] == h["total_blocks"]) or \
                    time.time() > deadline:
                return h
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    s = Server(tiny_checkpoint)
    yield s
    s.stop()


def _direct(server, prompt_ids, max_tokens):
    """The same request through a separate engine, alone (same weights, greedy): the reference."""
    eng = Engine(server.engine.model, num_blocks=64, eos_token_id=server.tokenizer.eos_id)
    out = eng.generate([prompt_ids], SamplingParams(max_tokens=max_tokens))[0]
    return out


def test_models_and_health(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    h = server.health()
    assert h["status"] == "ok" and h["total_blocks"] > 0


def test_completion_matches_engine(server):
    prompt = "def fibonacci(n):"
    r = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    ids = server.tokenizer.encode(prompt, add_bos=True)  # bos first, as transformers' tokenizer(prompt) and vLLM
    assert ids == server.tokenizer.tok.encode(prompt).ids
    ref = _direct(server, ids, 12)
    assert r.choices[0].text == server.tokenizer.decode(ref.token_ids)
    assert r.choices[0].finish_reason == ("stop" if ref.finish_reason == "stop" else "length")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == len(ids) + len(ref.token_ids)
    # token-id prompts and several prompts at once
    r2 = server.client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=12, temperature=0)
    assert [c.text for c in r2.choices] == [r.choices[0].text] * 2


def test_completion_stream(server):
    kw = dict(model=MODEL, prompt="import os\n", max_tokens=16, temperature=0)
    whole = server.client.completions.create(**kw).choices[0].text
    chunks = list(server.client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_text_offsets_count_characters_and_run_on_across_chunks(server):
    """logprobs' `text_offset`: each token's character offset in the returned text, a character split over
    byte-level tokens counted once (not once per token); streamed, the offsets run on from chunk to chunk."""
    prompt = "héllo 世界 ok done"
    ids = server.tokenizer.encode(prompt, add_bos=True)
    r = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert r.choices[0].text == prompt and len(r.choices[0].logprobs.tokens) == len(ids)
    want = [len(server.tokenizer.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]
    assert len(ids) > len(prompt) - 3  # characters split over tokens, so counting token strings would drift
    assert r.choices[0].logprobs.text_offset == want
    kw = dict(model=MODEL, prompt="import os\n", max_tokens=10, temperature=0, logprobs=0)
    whole = server.client.completions.create(**kw).choices[0].logprobs.text_offset
    chunks = server.client.completions.create(stream=True, **kw)
    streamed = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert streamed == whole and len(whole) == 10 and whole[-1] > 0


def test_chat_stream_equals_non_stream(server):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    r = server.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant"
    # the prompt is the checkpoint's chat template
    ids = server.template.encode(msgs)
    assert server.tokenizer.decode(ids, skip_special_tokens=False).endswith("User: What is a list?\n\nAssistant:")
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == server.tokenizer.decode(_direct(server, ids, 20).token_ids)
    stream = server.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_chat_logprobs_and_seeded_sampling(server):
    msgs = [{"role": "user", "content": "hello"}]
    r = server.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0,
                                              logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)  # greedy took the top one
    kw = dict(model=MODEL, messages=msgs, max_tokens=8, temperature=1.0, top_p=0.9, seed=11)
    a = server.client.chat.completions.create(**kw).choices[0].message.content
    b = server.client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_chat_without_max_tokens_on_a_pool_smaller_than_the_context(tiny_checkpoint):
    """Chat's default max_tokens is the rest of the context; with a KV pool smaller than the model's context the
    server's context is the pool's, so such a request is served (not refused as one that can never fit)."""
    s = Server(tiny_checkpoint, kv_cache_memory="120KB")
    try:
        capacity = s.engine.pool.num_blocks * s.engine.pool.block_size
        assert capacity < 512 and s.engine.max_model_len == capacity
        assert s.client.models.list().data[0].model_extra["max_model_len"] == capacity
        r = s.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    finally:
        s.stop()


def test_stop_string(server):
    kw = dict(model=MODEL, prompt="class Foo:", max_tokens=24, temperature=0)
    full = server.client.completions.create(**kw).choices[0].text
    stop = full[5:8]
    assert stop.strip(), full
    aborted = server.health()["aborted"]
    r = server.client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(server.client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]
    h = server.wait_idle()
    assert h["free_blocks"] == h["total_blocks"]  # ended early in the engine too
    assert h["aborted"] == aborted  # finished, not cancelled


BAD = [
    (b'{"model": "tiny-test", "prompt": "hi"', 400, None),  # malformed JSON
    (b'not json at all', 400, None),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),  # wrong types
    ({"model": MODEL, "prompt": 5}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),  # unknown model
    ({"prompt": "hi"}, 400, "model"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),  # too large for the context
    ({"model": MODEL, "prompt": "hi " * 600}, 400, "prompt"),  # prompt longer than the context
    ({"model": MODEL, "prompt": "hi", "temperature": 2.5}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "temperature": -0.1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({"model": MODEL, "prompt": [[1, 2, 10**6]]}, 400, None),  # token id outside the vocabulary
]

BAD_CHAT = [
    ({"model": MODEL, "messages": []}, 400, "messages"),  # empty messages
    ({"model": MODEL, "messages": "hello"}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 600}]}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
]


@pytest.mark.parametrize("path,cases", [("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)])
def test_bad_input_gets_openai_errors_and_server_keeps_serving(server, path, cases):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for body, status, param in cases:
            kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
                else {"json": body}
            r = http.post(path, **kw)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"] == "invalid_request_error", err
            if param is not None:
                assert err["param"] == param, (body, err)
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2, "temperature": None,
                                               "top_p": None, "n": None})  # null means the default
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert server.wait_idle()["free_blocks"] == server.health()["total_blocks"]


def test_32_parallel_requests_match_running_alone(server):
    prompts = [f"def function_{i}(x, y):\n    return" for i in range(32)]

    def ask(p):
        r = server.client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0)
        return r.choices[0].text

    alone = [ask(p) for p in prompts[:8]]  # one at a time
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, prompts))
    assert together[:8] == alone
    for p, text in zip(prompts, together):
        ref = _direct(server, server.tokenizer.encode(p, add_bos=True), 16)
        assert text == server.tokenizer.decode(ref.token_ids)
    assert server.wait_idle()["free_blocks"] == server.health()["total_blocks"]


def test_client_disconnect_frees_blocks(server):
    body = {"model": MODEL, "prompt": "while True:", "max_tokens": 480, "ignore_eos": True, "temperature": 0}
    aborted = server.health()["aborted"]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert any(line.startswith("data: ") for line in got)
            assert server.health()["running"] == 1
        # the stream is closed mid-way: the server cancels the request and frees its blocks
    h = server.wait_idle()
    assert h["running"] == 0 and h["free_blocks"] == h["total_blocks"], h
    assert h["aborted"] == aborted + 1  # cancelled, not run to its end
    # non-streaming: the client times out and goes away
    with httpx.Client(base_url=server.url, timeout=0.1) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body)
    h = server.wait_idle()
    assert h["running"] == 0 and h["free_blocks"] == h["total_blocks"], h
    assert h["aborted"] == aborted + 2


def test_full_queue_answers_503(server):
    s = Server(None, like=server, max_batch_size=1, max_waiting=1)
    try:
        body = {"model": MODEL, "prompt": "for i in range(10):", "max_tokens": 300, "ignore_eos": True}

        def post(_):
            r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code != 503 or r.headers["retry-after"]  # an overload says when to come back
            return r.status_code, r.json()

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(post, range(4)))
        codes = sorted(c for c, _ in results)
        assert 503 in codes and 200 in codes, codes
        err = next(j for c, j in results if c == 503)["error"]
        assert err["type"] == "server_error" and "overloaded" in err["message"]
        assert s.wait_idle()["free_blocks"] == s.health()["total_blocks"]
        assert httpx.post(s.url + "/v1/completions", json={**body, "max_tokens": 2}).status_code == 200
    finally:
        s.stop()
