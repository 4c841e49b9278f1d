"""The bridge between the server's event loop and the engine thread: choices, their events, drain and metrics.

The engine runs in its own thread (`EngineLoop`); its per-request callback (on the engine thread) detokenizes the
new tokens, matches stop strings and hands an `Event` to the event loop, so the event loop itself only writes.
`Bridge.open` submits one engine request per choice (all or none), `Bridge.events` yields a choice's events,
`Bridge.close` aborts what is left (a client that went away). Draining (SIGTERM) refuses new requests, lets the
running ones finish for a grace period and ends the rest with an error event. Usable without HTTP:

    bridge = Bridge(EngineLoop(engine).start(), tokenizer)
    choices = bridge.open(prepared)                   # api.prepare_completion(...)
    async for ev in bridge.events(choices[0]): ...
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dsv2.infer.api import APIError, Prepared
from dsv2.infer.engine import EngineLoop, QueueFull, RequestOutput, SamplingParams
from dsv2.infer.text import TextStream

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1


@dataclass
class Event:
    """What one engine step gave one choice, as text."""

    text: str
    logprobs: list  # [(token id, logprob, [(id, logprob) top])] of the generated tokens
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "error"
    prompt_logprobs: list | None = None  # on the first event, when asked for
    error: str | None = None
    n_tokens: int = 0


class Choice:
    """One engine request behind one choice of a response."""

    def __init__(self, index: int, prompt: list[int], params: SamplingParams, stops: list[str], tokenizer,
                 aloop: asyncio.AbstractEventLoop, bridge: "Bridge"):
        self.index, self.prompt, self.params = index, prompt, params
        self.text = TextStream(tokenizer.decode, stops)
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.rid: str | None = None
        self.finished = False  # seen by the event loop
        self.finish_reason: str | None = None
        self.n_tokens = 0
        self.started = time.perf_counter()
        self._done_in_engine = False
        self._aloop, self._bridge = aloop, bridge

    def on_output(self, out: RequestOutput) -> None:
        """Engine thread: the request's tokens -> text (stop strings applied) -> an Event for the event loop."""
        if self._done_in_engine:
            return
        if out.finish_reason == "error":
            ev = Event("", [], True, "error", error="the request failed in the engine (see the server log)")
        else:
            delta = self.text.push(out.token_ids)
            lps = []
            if out.logprobs is not None:
                tops = out.top_logprobs or [[] for _ in out.token_ids]
                lps = list(zip(out.token_ids, out.logprobs, tops))
            ev = Event(delta, lps, prompt_logprobs=out.prompt_logprobs)
            ev.n_tokens = len(out.token_ids)
            if out.finished or self.text.stopped:
                ev.finished, ev.finish_reason = True, "stop" if self.text.stopped else out.finish_reason
                if self.text.stopped and not out.finished:
                    self._bridge.loop.abort(self.rid, "stop")  # a stop string ended it: free its blocks now
                ev.text += self.text.finish()
        self._done_in_engine = ev.finished
        self._aloop.call_soon_threadsafe(self.queue.put_nowait, ev)

    def fail(self, message: str) -> None:
        """Event loop: end this choice with an error event (drain timeout, engine death)."""
        if not self._done_in_engine:
            self._done_in_engine = True
            self._bridge.loop.abort(self.rid)
            self.queue.put_nowait(Event("", [], True, "error", error=message))


class Metrics:
    """Prometheus metrics of one server (its own registry): requests, tokens, latencies, and the engine's gauges."""

    def __init__(self, loop: EngineLoop, bridge: "Bridge"):
        self.registry = CollectorRegistry()
        self.requests = Counter("dsv2_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("dsv2_prompt_tokens", "prompt tokens of finished choices",
                                     registry=self.registry)
        self.generation_tokens = Counter("dsv2_generation_tokens", "generated tokens", registry=self.registry)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.latency = Histogram("dsv2_request_latency_seconds", "submit to last token, per choice",
                                 buckets=buckets, registry=self.registry)
        self.ttft = Histogram("dsv2_time_to_first_token_seconds", "submit to first token, per choice",
                              buckets=buckets, registry=self.registry)
        self.registry.register(_EngineCollector(loop, bridge))


class _EngineCollector:
    def __init__(self, loop: EngineLoop, bridge: "Bridge"):
        self.loop, self.bridge = loop, bridge

    def collect(self):
        s = self.loop.stats()
        for name, key, doc in (("dsv2_running_requests", "running", "requests being decoded"),
                               ("dsv2_waiting_requests", "waiting", "requests in the queue"),
                               ("dsv2_cache_free_blocks", "free_blocks", "free KV cache blocks"),
                               ("dsv2_cache_total_blocks", "total_blocks", "KV cache blocks")):
            yield GaugeMetricFamily(name, doc, value=s[key])
        yield GaugeMetricFamily("dsv2_cache_usage", "fraction of KV cache blocks in use",
                                value=1 - s["free_blocks"] / max(s["total_blocks"], 1))
        yield CounterMetricFamily("dsv2_preemptions", "requests preempted (recomputed later)",
                                  value=s["preemptions"])
        yield GaugeMetricFamily("dsv2_up", "1 while serving, 0 draining or engine dead",
                                value=float(self.bridge.status() == "ok"))


class Bridge:
    """Choices between an asyncio event loop and an EngineLoop. Create it inside the event loop's thread."""

    def __init__(self, loop: EngineLoop, tokenizer):
        self.loop, self.tokenizer = loop, tokenizer
        self.draining = False
        self.active: set[Choice] = set()
        self.metrics = Metrics(loop, self)

    def status(self) -> str:
        """"ok", "draining" (SIGTERM received) or "dead" (the engine thread has stopped)."""
        if not self.loop.alive:
            return "dead"
        return "draining" if self.draining else "ok"

    async def run(self, fn, *args):
        """fn(*args) in a worker thread (tokenization, parsing): the event loop keeps answering meanwhile."""
        return await asyncio.to_thread(fn, *args)

    def open(self, prepared: Prepared) -> list[Choice]:
        """Submit one engine request per choice, all or none. APIError 503 (with Retry-After) when the queue is
        full or the server is draining or dead; 400 when the engine says the request can never run."""
        status = self.status()
        if status != "ok":
            raise APIError(503, "the server is shutting down" if status == "draining" else
                           "the engine has stopped; the server is exiting", kind="server_error", code=status,
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        aloop = asyncio.get_running_loop()
        choices: list[Choice] = []
        try:
            for i, params in enumerate(prepared.params):
                c = Choice(i, prepared.prompts[i // prepared.n], params, prepared.stops, self.tokenizer, aloop, self)
                c.rid = self.loop.submit(c.prompt, params, c.on_output)
                choices.append(c)
        except QueueFull as e:
            self.close(choices)
            raise APIError(503, f"server overloaded: {e}; retry later", kind="server_error", code="overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ValueError as e:
            self.close(choices)
            raise APIError(400, str(e), "prompt") from None
        self.active.update(choices)
        return choices

    async def events(self, choice: Choice):
        """The choice's events until it ends."""
        first = True
        while not choice.finished:
            ev = await choice.queue.get()
            n = ev.n_tokens
            if n and first:
                self.metrics.ttft.observe(time.perf_counter() - choice.started)
                first = False
            choice.n_tokens += n
            if ev.finished:
                choice.finished, choice.finish_reason = True, ev.finish_reason
                self._finished(choice)
            yield ev

    def _finished(self, c: Choice) -> None:
        self.active.discard(c)
        self.metrics.latency.observe(time.perf_counter() - c.started)
        self.metrics.prompt_tokens.inc(len(c.prompt))
        self.metrics.generation_tokens.inc(c.n_tokens)

    def close(self, choices: list[Choice]) -> None:
        """Abort the choices still running (a client that went away; a refused request)."""
        for c in choices:
            if not c.finished:
                self.active.discard(c)
                c.finished, c.finish_reason = True, "abort"
                if c.rid is not None:
                    self.loop.abort(c.rid)

    def fail_all(self, message: str) -> None:
        for c in list(self.active):
            c.fail(message)

    async def drain(self, grace_s: float) -> None:
        """Refuse new requests, let the running ones finish for up to grace_s, end the rest with an error event;
        returns once every stream has had its last event read (or 5 s more)."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.active:
            log.warning("drain: %d choice(s) still running after %.0f s; ending them", len(self.active), grace_s)
            self.fail_all(f"the server is shutting down (grace period of {grace_s:g} s over)")
        deadline = time.monotonic() + 5
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
