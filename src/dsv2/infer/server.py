"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn): thin routes over api.py and bridge.py.

    dsv2 serve --model runs/chat --port 8000 --kv-cache-memory 1GB
    curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "stream": true}'

Endpoints: POST /v1/completions (echo and prompt log-probs, max_tokens 0 with echo, as lm-evaluation-harness's
local-completions uses them), POST /v1/chat/completions (both with `stream: true` as server-sent events and
`stream_options.include_usage`), GET /v1/models, GET /health (200 ok; 503 draining or engine dead; queue depth
and free cache blocks), GET /metrics (Prometheus). Every error is OpenAI-shaped ({"error": {"message", "type",
"param", "code"}}): 400 bad input (naming the field or the limit), 404 unknown model or route, 405 wrong method,
413 body over --max-body-size (refused from its Content-Length, or as soon as the bytes read pass the limit),
503 with Retry-After when the queue is full or the server is draining. A client that disconnects has its
requests cancelled and their cache blocks freed. Parsing, tokenization and detokenization run off the event loop
(worker threads, the engine thread), so /health answers while the server is busy. SIGTERM drains (see `serve`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv2.infer.api import (APIError, ChatRequest, CompletionRequest, Limits, parse, prepare_chat,
                            prepare_completion)
from dsv2.infer.bridge import Bridge, Choice
from dsv2.infer.engine import EngineLoop
from dsv2.infer.text import ChatTemplate, TextOffsets, special_ids, token_bytes
from dsv2.tokenizer import Tokenizer

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 4 * 2**20


# ---- what the responses look like (for /openapi.json; the routes build plain dicts) ---------------------------
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatMessageOut(BaseModel):
    role: str
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict | None
    finish_reason: str | None


class ChatResponse(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


def _errors(*codes: int) -> dict:
    what = {400: "invalid request (the field or limit is named)", 404: "unknown model", 413: "body too large",
            503: "queue full or server draining (Retry-After)"}
    return {c: {"model": ErrorResponse, "description": what[c]} for c in codes}


def _post_doc(body: type[BaseModel], response: type[BaseModel]) -> dict:
    return dict(
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body.__name__}"}}}}},
        responses={200: {"model": response, "description": "the response; with stream: true, server-sent events",
                         "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                   **_errors(400, 404, 413, 503)})


# ---- the app -------------------------------------------------------------------------------------------------
def create_app(engine: EngineLoop, tokenizer: Tokenizer, template: ChatTemplate, model_name: str | list[str],
               max_model_len: int, *, max_body_bytes: int = MAX_BODY_BYTES, max_stop_chars: int = 1024) -> FastAPI:
    """The FastAPI app serving `engine`. model_name: the served id, or a list (the first is the id responses carry;
    all are accepted and listed by /v1/models). The caller starts and stops the EngineLoop; app.state.bridge is
    the Bridge (drain, metrics)."""
    names = (model_name,) if isinstance(model_name, str) else tuple(model_name)
    app = FastAPI(title="dsv2", version="0.1.0", description=__doc__)
    bridge = Bridge(engine, tokenizer)
    app.state.bridge = bridge
    eng = engine.engine
    limits = Limits(names, max_model_len, eng.model.config.vocab_size, max_choices=max(eng.max_waiting, 1),
                    eos_id=tokenizer.eos_id, max_stop_chars=max_stop_chars)
    created = int(time.time())
    specials = special_ids(tokenizer)
    app.add_middleware(_CountRequests, metrics=bridge.metrics)

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        msg = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on "
                                                         f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error(APIError(exc.status_code, msg, code={404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code), headers=dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error(APIError(400, str(exc.errors()[:1])))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error(APIError(500, "internal server error (see the server log)", kind="server_error"))

    @app.get("/health", responses={503: {"description": "draining, or the engine has died"}})
    async def health():
        status = bridge.status()
        return JSONResponse({"status": status, "model": names[0], **engine.stats()}, 200 if status == "ok" else 503,
                            headers={} if status == "ok" else {"Retry-After": "1"})

    @app.get("/metrics", response_class=Response)
    async def metrics():
        return Response(generate_latest(bridge.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "dsv2",
                                            "root": names[0], "max_model_len": max_model_len} for n in names]}

    async def read_body(request: Request) -> bytes:
        """The body, refused (413) from its Content-Length or as soon as more than max_body_bytes arrived."""
        too_big = APIError(413, f"the request body is larger than the server's limit of {max_body_bytes} bytes",
                           code="request_too_large", headers={"Connection": "close"})
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def prep_completion(raw: bytes):
        body = parse(raw, CompletionRequest)
        return body, prepare_completion(body, tokenizer, limits)

    def prep_chat(raw: bytes):
        body = parse(raw, ChatRequest)
        return body, prepare_chat(body, template, limits)

    # ---- /v1/completions ---------------------------------------------------------------------------------
    @app.post("/v1/completions", **_post_doc(CompletionRequest, CompletionResponse))
    async def completions(request: Request):
        body, prepared = await bridge.run(prep_completion, await read_body(request))
        choices = bridge.open(prepared)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        k = body.logprobs

        def token_str(t: int) -> str:
            return tokenizer.decode([t], skip_special_tokens=False)

        def logprobs_obj(c: Choice, lps, prompt_lps, offsets: TextOffsets) -> dict | None:
            """OpenAI's legacy shape; with echo, the prompt's tokens first (the first with a null log-prob).
            `offsets` counts on from the choice's previous chunk (streaming)."""
            if k is None:
                return None
            ids, token_lps, tops = [], [], []
            if prompt_lps is not None:
                ids = list(c.prompt)
                token_lps = [None] + [lp for lp, _ in prompt_lps]
                tops = [None] + [{token_str(i): v for i, v in top} for _, top in prompt_lps]
            ids += [t for t, _, _ in lps]
            token_lps += [lp for _, lp, _ in lps]
            tops += [{token_str(i): v for i, v in top} for _, _, top in lps]
            return {"tokens": [token_str(t) for t in ids], "token_logprobs": token_lps, "text_offset": offsets(ids),
                    "top_logprobs": tops if k else None}

        def echo(c: Choice) -> str:
            return prepared.echo_text[c.index // prepared.n] if prepared.echo_text else ""

        if body.stream:
            offsets: dict[int, TextOffsets] = {}  # per choice, counting on from chunk to chunk

            def chunk(c, ev):
                if ev is None:
                    return None
                first = c.index not in offsets  # the echo (text and prompt log-probs) leads a choice's first chunk
                at = offsets.setdefault(c.index, TextOffsets(tokenizer, specials))
                lp = logprobs_obj(c, ev.logprobs, ev.prompt_logprobs if first else None, at)
                return {"id": rid, "object": "text_completion", "created": now, "model": names[0],
                        "choices": [{"index": c.index, "text": (echo(c) if first else "") + ev.text, "logprobs": lp,
                                     "finish_reason": c.finish_reason if c.finished else None}]}

            return _stream(bridge, choices, chunk, lambda: {
                "id": rid, "object": "text_completion", "created": now, "model": names[0], "choices": [],
                "usage": _usage(choices, prepared.n)} if body.include_usage else None)

        events = await _collect(bridge, request, choices)

        def result(c: Choice) -> dict:
            evs = events[c.index]
            lps = [x for ev in evs for x in ev.logprobs]
            prompt_lps = next((ev.prompt_logprobs for ev in evs if ev.prompt_logprobs is not None), None)
            return {"index": c.index, "text": echo(c) + "".join(ev.text for ev in evs),
                    "logprobs": logprobs_obj(c, lps, prompt_lps, TextOffsets(tokenizer, specials)),
                    "finish_reason": c.finish_reason}

        out = await bridge.run(lambda: [result(c) for c in choices])  # formatting a long echo is not free
        return {"id": rid, "object": "text_completion", "created": now, "model": names[0], "choices": out,
                "usage": _usage(choices, prepared.n)}

    # ---- /v1/chat/completions ----------------------------------------------------------------------------
    @app.post("/v1/chat/completions", **_post_doc(ChatRequest, ChatResponse))
    async def chat_completions(request: Request):
        body, prepared = await bridge.run(prep_chat, await read_body(request))
        choices = bridge.open(prepared)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def entry(token_id: int, lp: float) -> dict:
            b = token_bytes(tokenizer, token_id)
            return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

        def logprobs_obj(lps):
            if not body.logprobs:
                return None
            return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]} for t, lp, top in lps]}

        if body.stream:
            def chunk(c, ev):
                if ev is None:
                    d, fin, lp = {"role": "assistant", "content": ""}, None, None
                else:
                    d = {"content": ev.text} if ev.text else {}
                    fin = c.finish_reason if c.finished else None
                    lp = logprobs_obj(ev.logprobs)
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": names[0],
                        "choices": [{"index": c.index, "delta": d, "logprobs": lp, "finish_reason": fin}]}

            return _stream(bridge, choices, chunk, lambda: {
                "id": rid, "object": "chat.completion.chunk", "created": now, "model": names[0], "choices": [],
                "usage": _usage(choices, prepared.n)} if body.include_usage else None)

        events = await _collect(bridge, request, choices)
        return {"id": rid, "object": "chat.completion", "created": now, "model": names[0],
                "choices": [{"index": c.index,
                             "message": {"role": "assistant", "content": "".join(ev.text for ev in events[c.index])},
                             "logprobs": logprobs_obj([x for ev in events[c.index] for x in ev.logprobs]),
                             "finish_reason": c.finish_reason} for c in choices],
                "usage": _usage(choices, prepared.n)}

    app.openapi_schema = None
    _add_body_schemas(app, [CompletionRequest, ChatRequest])
    return app


def _add_body_schemas(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """The request bodies are parsed by api.parse (off the event loop), not by FastAPI: put their JSON schemas
    into /openapi.json ourselves."""
    base = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = base()
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for m in models:
                s = m.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(s.pop("$defs", {}))
                comps[m.__name__] = s
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _usage(choices: list[Choice], n: int) -> dict:
    prompt = sum(len(c.prompt) for c in choices[::n])  # choices run prompt-major, n per prompt
    completion = sum(c.n_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _collect(bridge: Bridge, request: Request, choices: list[Choice]) -> dict[int, list]:
    """Every choice's events (non-streaming); if the client goes away, stop and abort them all. A choice that
    fails answers 500 (503 while draining) for the whole request."""
    events: dict[int, list] = {c.index: [] for c in choices}

    async def drain(c):
        async for ev in bridge.events(c):
            if ev.error:
                raise APIError(503 if bridge.draining else 500, ev.error, kind="server_error",
                               headers={"Retry-After": "1"} if bridge.draining else None)
            events[c.index].append(ev)

    main = asyncio.ensure_future(asyncio.gather(*(drain(c) for c in choices)))

    async def watch():
        while not main.done():
            if await request.is_disconnected():
                main.cancel()
                return
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        await main
    finally:
        watcher.cancel()
        bridge.close(choices)
    return events


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _stream(bridge: Bridge, choices: list[Choice], chunk, usage_chunk) -> StreamingResponse:
    """Server-sent events from all choices as their tokens arrive; an error event for a choice that fails; always
    ends with [DONE]. Cancelled (and aborted) when the client goes away."""
    async def gen():
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(c):
            async for ev in bridge.events(c):
                await merged.put((c, ev))
            await merged.put((c, None))

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            for c in choices:
                first = chunk(c, None)
                if first is not None:
                    yield _sse(first)
            open_ = len(choices)
            while open_:
                c, ev = await merged.get()
                if ev is None:
                    open_ -= 1
                elif ev.error:
                    yield _sse(APIError(500, ev.error, kind="server_error", code="choice_failed").body() |
                               {"index": c.index})
                elif ev.text or ev.logprobs or ev.prompt_logprobs is not None or c.finished:
                    yield _sse(chunk(c, ev))
            usage = usage_chunk()
            if usage is not None:
                yield _sse(usage)
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (Starlette cancels this generator)
            for t in tasks:
                t.cancel()
            bridge.close(choices)

    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _CountRequests:
    """ASGI middleware: count answered requests by route and status (for /metrics)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            known = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
            self.metrics.requests.labels(path if path in known else "other", str(status[0])).inc()


# ---- running it ----------------------------------------------------------------------------------------------
class Server(uvicorn.Server):
    """uvicorn with SIGTERM draining and an exit code: SIGTERM stops admission (503 + Retry-After, /health says
    draining), lets in-flight requests finish for `grace_s`, ends the rest with an error event and [DONE], then
    exits (exit_code 0). If the engine thread dies, in-flight requests end with an error and exit_code is 1.
    A second SIGTERM, or SIGINT, exits at once as uvicorn does."""

    def __init__(self, config: uvicorn.Config, bridge: Bridge, grace_s: float = 30.0):
        super().__init__(config)
        self.bridge, self.grace_s = bridge, grace_s
        self.exit_code = 0
        self._drain_requested = False
        self._drain: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:
        if sig == signal.SIGTERM and not self._drain_requested:
            self._drain_requested = True  # picked up by on_tick (this runs inside a signal handler)
            log.warning("SIGTERM: draining for up to %g s", self.grace_s)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain is None:
            self._drain = asyncio.create_task(self.bridge.drain(self.grace_s))
        if self._drain is not None and self._drain.done():
            return True
        if self.bridge.status() == "dead":
            log.error("the engine thread has died; ending the requests in flight and exiting")
            self.bridge.fail_all("the engine has stopped")
            await asyncio.sleep(0.5)  # let the streams write their error event
            self.exit_code = 1
            return True
        return await super().on_tick(counter)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          grace_s: float = 30.0) -> int:
    """Run the app until SIGINT/SIGTERM (drained) or the engine's death; returns the exit code."""
    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5),
                    app.state.bridge, grace_s)
    server.run()
    return server.exit_code
