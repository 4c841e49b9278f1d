"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

    dsv2 serve --model runs/chat --port 8000 --kv-cache-memory 1GB
    curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "stream": true}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent events and
`stream_options.include_usage`), GET /v1/models, GET /health. Beyond OpenAI's fields: top_k, stop_token_ids,
ignore_eos (as vLLM). Errors are OpenAI-style JSON ({"error": {"message", "type", "param", "code"}}) with 400 for
bad input, 404 for an unknown model, 503 when the waiting queue is full. A client that disconnects (streaming or
not) has its requests cancelled and their cache blocks freed. The engine runs in its own thread (EngineLoop);
the event loop only parses, detokenizes and writes.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from dsv2.infer.engine import MAX_LOGPROBS, EngineLoop, QueueFull, RequestOutput, SamplingParams
from dsv2.infer.text import ChatTemplate, TextStream, token_bytes
from dsv2.tokenizer import Tokenizer


# ---- request bodies ------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # "5" is not a number; unknown fields are ignored

    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # null means the default, as in OpenAI's API
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool | None = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def model_post_init(self, _context) -> None:
        defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "n": 1, "stream": False, "ignore_eos": False,
                    "presence_penalty": 0.0, "frequency_penalty": 0.0}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]


class ChatBody(_Body):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


# ---- the app -------------------------------------------------------------------------------------------------
class _Choice:
    """One engine request behind one choice: its output queue (fed from the engine thread) and its text."""

    def __init__(self, index: int, prompt: list[int], params: SamplingParams, stop: list[str], tokenizer: Tokenizer):
        self.index, self.prompt, self.params = index, prompt, params
        self.text = TextStream(lambda ids: tokenizer.decode(ids), stop)
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.rid: str | None = None
        self.finished = False
        self.finish_reason: str | None = None
        self.n_tokens = 0

    async def events(self, engine: EngineLoop):
        """Yield (text delta, [(token, logprob, top)]) per engine step until the request ends."""
        while not self.finished:
            out = await self.queue.get()
            if out.finish_reason == "error":
                raise APIError(500, "the request failed in the engine (see the server log)", kind="server_error")
            self.n_tokens += len(out.token_ids)
            delta = self.text.push(out.token_ids)
            lps = []
            if out.logprobs is not None:
                tops = out.top_logprobs or [[] for _ in out.token_ids]
                lps = list(zip(out.token_ids, out.logprobs, tops))
            if out.finished or self.text.stopped:
                self.finished = True
                self.finish_reason = "stop" if self.text.stopped else out.finish_reason
                if self.text.stopped and not out.finished:
                    engine.abort(self.rid)  # a stop string ended it: free its blocks now
                delta += self.text.finish()
            yield delta, lps


def create_app(engine: EngineLoop, tokenizer: Tokenizer, template: ChatTemplate, model_name: str,
               max_model_len: int) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name`. The caller starts and stops the EngineLoop."""
    app = FastAPI(title="dsv2", version="0.1.0")
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
        # the field path, without pydantic's union-member labels ("str", "list[int]", "TextPart")
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and (isinstance(p, int) or (
            re.fullmatch(r"[a-z_][a-z0-9_]*", p) and p not in ("str", "int", "float", "bool", "list", "dict")))]
        param = ".".join(loc) or None
        return _error(400, f"invalid value for '{param}': {first.get('msg', 'invalid request')}" if param
                      else first.get("msg", "invalid request"), param)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.code, exc.kind)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dsv2", "max_model_len": max_model_len}]}

    def check(body: _Body, max_tokens: int | None, prompts: list[list[int]], prompt_param: str) -> SamplingParams:
        if body.model != model_name:
            raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{model_name}`",
                           "model", "model_not_found")
        if not 0.0 <= body.temperature <= 2.0:
            raise APIError(400, f"temperature must be in [0, 2], got {body.temperature}", "temperature")
        if not 0.0 < body.top_p <= 1.0:
            raise APIError(400, f"top_p must be in (0, 1], got {body.top_p}", "top_p")
        if body.top_k < 0:
            raise APIError(400, f"top_k must be >= 0, got {body.top_k}", "top_k")
        if not 1 <= body.n <= 16:
            raise APIError(400, f"n must be in [1, 16], got {body.n}", "n")
        if body.presence_penalty or body.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported", "presence_penalty")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences", "stop")
        longest = max(len(p) for p in prompts)
        if longest >= max_model_len:
            raise APIError(400, f"the prompt has {longest} tokens; this model's context is {max_model_len} tokens",
                           prompt_param, "context_length_exceeded")
        if max_tokens is None:
            max_tokens = max_model_len - longest
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        if longest + max_tokens > max_model_len:
            raise APIError(400, f"max_tokens ({max_tokens}) + prompt ({longest} tokens) exceeds the context of "
                                f"{max_model_len} tokens", "max_tokens", "context_length_exceeded")
        stop_ids = tuple(body.stop_token_ids or ()) + ((tokenizer.eos_id,) if not body.ignore_eos else ())
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, seed=body.seed, stop_token_ids=stop_ids, ignore_eos=body.ignore_eos)

    async def start(prompts: list[list[int]], params: SamplingParams, n: int, stops: list[str]) -> list[_Choice]:
        aloop = asyncio.get_running_loop()
        choices = []
        try:
            for i, prompt in enumerate(p for p in prompts for _ in range(n)):
                sp = params if params.seed is None else SamplingParams(**{**params.__dict__, "seed": params.seed + i})
                c = _Choice(i, prompt, sp, stops, tokenizer)
                c.rid = engine.submit(prompt, sp, lambda out, q=c.queue: aloop.call_soon_threadsafe(q.put_nowait, out))
                choices.append(c)
        except QueueFull as e:
            for c in choices:
                engine.abort(c.rid)
            raise APIError(503, f"server overloaded: {e}; retry later", kind="server_error",
                           code="overloaded") from None
        except ValueError as e:
            for c in choices:
                engine.abort(c.rid)
            raise APIError(400, str(e)) from None
        return choices

    async def collect(request: Request, choices: list[_Choice]) -> tuple[dict[int, str], dict[int, list]]:
        """Drain every choice (non-streaming) into (text, logprobs) per choice index; if the client goes away,
        stop and abort them all."""
        texts: dict[int, list[str]] = {c.index: [] for c in choices}
        all_lps: dict[int, list] = {c.index: [] for c in choices}

        async def drain(c):
            async for delta, lps in c.events(engine):
                texts[c.index].append(delta)
                all_lps[c.index] += lps

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
            for c in choices:
                if not c.finished:
                    engine.abort(c.rid)
        return {i: "".join(t) for i, t in texts.items()}, all_lps

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def stream(choices: list[_Choice], chunk, usage_chunk):
        """Server-sent events from all choices as their tokens arrive; cancelled (and aborted) on disconnect."""
        async def gen():
            merged: asyncio.Queue = asyncio.Queue()

            async def pump(c):
                try:
                    async for delta, lps in c.events(engine):
                        await merged.put((c, delta, lps))
                except APIError as e:
                    await merged.put((c, e, None))
                await merged.put((c, None, None))

            tasks = [asyncio.create_task(pump(c)) for c in choices]
            try:
                for c in choices:
                    first = chunk(c, None, None, first=True)
                    if first is not None:
                        yield sse(first)
                open_ = len(choices)
                while open_:
                    c, delta, lps = await merged.get()
                    if isinstance(delta, APIError):
                        yield sse({"error": {"message": delta.message, "type": delta.kind}})
                        continue
                    if delta is None:
                        open_ -= 1
                        continue
                    if delta or lps or c.finished:
                        yield sse(chunk(c, delta, lps))
                if usage_chunk is not None:
                    yield sse(usage_chunk())
                yield "data: [DONE]\n\n"
            finally:  # normal end, or the client went away (Starlette cancels this generator)
                for t in tasks:
                    t.cancel()
                for c in choices:
                    if not c.finished:
                        engine.abort(c.rid)

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def usage(choices: list[_Choice], n: int) -> dict:
        prompt = sum(len(c.prompt) for c in choices[::n])  # choices run prompt-major, n per prompt
        completion = sum(c.n_tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def include_usage(body: _Body) -> bool:
        return bool(body.stream_options and body.stream_options.get("include_usage"))

    # ---- /v1/completions ---------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        p = body.prompt
        if isinstance(p, str):
            prompts = [tokenizer.encode(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [tokenizer.encode(x) for x in p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = [list(x) for x in p]
        if not prompts or any(len(x) == 0 for x in prompts):
            raise APIError(400, "the prompt is empty", "prompt")
        if body.echo:
            raise APIError(400, "echo is not supported", "echo")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}]", "logprobs")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        params = check(body, max_tokens, prompts, "prompt")
        params.logprobs = body.logprobs
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        choices = await start(prompts, params, body.n, stops)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def logprobs_obj(lps, offset: int):
            if body.logprobs is None:
                return None
            toks = [tokenizer.decode([t], skip_special_tokens=False) for t, _, _ in lps]
            offsets, o = [], offset
            for s in toks:
                offsets.append(o)
                o += len(s)
            return {"tokens": toks, "token_logprobs": [lp for _, lp, _ in lps], "text_offset": offsets,
                    "top_logprobs": [{tokenizer.decode([i], skip_special_tokens=False): v for i, v in top}
                                     for _, _, top in lps] if body.logprobs else None}

        if body.stream:
            def chunk(c, delta, lps, first=False):
                if first:
                    return None
                return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                        "choices": [{"index": c.index, "text": delta, "logprobs": logprobs_obj(lps, 0),
                                     "finish_reason": c.finish_reason if c.finished else None}]}

            def usage_chunk():
                return {"id": rid, "object": "text_completion", "created": now, "model": model_name, "choices": [],
                        "usage": usage(choices, body.n)}

            return stream(choices, chunk, usage_chunk if include_usage(body) else None)

        texts, all_lps = await collect(request, choices)
        return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                "choices": [{"index": c.index, "text": texts[c.index],
                             "logprobs": logprobs_obj(all_lps[c.index], 0), "finish_reason": c.finish_reason}
                            for c in choices],
                "usage": usage(choices, body.n)}

    # ---- /v1/chat/completions ----------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in body.messages]
        try:
            prompt = template.encode(messages, add_generation_prompt=True)
        except Exception as e:  # a template that raises on these messages
            raise APIError(400, f"cannot apply the chat template: {e}", "messages") from None
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}]", "top_logprobs")
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = check(body, max_tokens, [prompt], "messages")
        params.logprobs = (body.top_logprobs or 0) if body.logprobs else None
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        choices = await start([prompt], params, body.n, stops)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def entry(token_id: int, lp: float) -> dict:
            b = token_bytes(tokenizer, token_id)
            return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

        def logprobs_obj(lps):
            if not body.logprobs:
                return None
            return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]} for t, lp, top in lps]}

        if body.stream:
            def chunk(c, delta, lps, first=False):
                if first:
                    d, fin, lp = {"role": "assistant", "content": ""}, None, None
                else:
                    d = {"content": delta} if delta else {}
                    fin = c.finish_reason if c.finished else None
                    lp = logprobs_obj(lps)
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [{"index": c.index, "delta": d, "logprobs": lp, "finish_reason": fin}]}

            def usage_chunk():
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [], "usage": usage(choices, body.n)}

            return stream(choices, chunk, usage_chunk if include_usage(body) else None)

        texts, all_lps = await collect(request, choices)
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": texts[c.index]},
                             "logprobs": logprobs_obj(all_lps[c.index]), "finish_reason": c.finish_reason}
                            for c in choices],
                "usage": usage(choices, body.n)}

    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
