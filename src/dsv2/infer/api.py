"""The server's OpenAI request bodies: the one place where OpenAI fields are validated and mapped to SamplingParams.

No HTTP here. `parse(raw, CompletionRequest)` turns a request body (bytes) into a validated model or raises
`APIError` (invalid UTF-8, invalid JSON, a lone surrogate, a value out of range: 400 naming the field);
`prepare_completion` / `prepare_chat` tokenize and range-check against the served model (`Limits`) and give the
prompts and one `SamplingParams` per choice. The server runs both off the event loop; the CLI's generate and chat
validate their flags through `sampling_fields` and `to_sampling_params`, the same code.

Fields we do not implement (tools, tool_choice, functions, function_call, response_format, logit_bias, best_of,
suffix, ...) are rejected with a 400 naming the field unless they hold their default (null, empty, best_of = n,
response_format {"type": "text"}); fields with no effect here (user, store, metadata, service_tier) are accepted
and ignored; any other unknown field is ignored, as OpenAI and vLLM do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dsv2.infer.engine import MAX_LOGPROBS, SamplingParams

MAX_N = 16  # choices per prompt
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1024  # per stop string (the default of Limits.max_stop_chars)
MAX_INT32 = 2**31 - 1

# OpenAI fields we do not implement -> the values that mean "not used" (accepted).
_UNIMPLEMENTED: dict[str, Any] = {
    "tools": lambda v: v is None or v == [],
    "tool_choice": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: v in (None, False),
    "functions": lambda v: v is None or v == [],
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "logit_bias": lambda v: v is None or v == {},
    "suffix": lambda v: v in (None, ""),
    "audio": lambda v: v is None,
    "modalities": lambda v: v is None or v == ["text"],
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
}


class APIError(Exception):
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What a request is checked against: the served model, its context, the queue bound."""

    model_names: tuple[str, ...]
    max_model_len: int
    vocab_size: int
    max_choices: int = 256  # the waiting-queue bound: a request with more choices can never be queued
    eos_id: int | None = None
    max_stop_chars: int = MAX_STOP_CHARS


# ---- the bodies ----------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    # "5" is not a number, NaN and Infinity are not numbers; unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class SamplingFields(_Strict):
    """The sampling fields both endpoints (and the CLI's generate/chat) share. null means the default."""

    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=MAX_INT32, description="0 or -1: off (vLLM)")] | None = None
    seed: Annotated[int, Field(ge=-2**63, le=2**64 - 1)] | None = None
    # each at most Limits.max_stop_chars long (the server's --max-stop-chars; checked in to_sampling_params)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0, le=MAX_INT32)]], Field(max_length=64)] | None = None
    ignore_eos: bool | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    max_tokens: Annotated[int, Field(ge=0, le=MAX_INT32)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2, description="only 0 is implemented")] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2, description="only 0 is implemented")] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_count(cls, v):  # before the union: its own error would only say "Input should be a valid string"
        if isinstance(v, list) and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(v)}")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class _Request(SamplingFields):
    model: Annotated[str, Field(max_length=256)]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored (OpenAI's end-user id)
    # not implemented: rejected unless they hold their default (see _UNIMPLEMENTED)
    logit_bias: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N, description="only best_of = n is implemented")] | None = None
    suffix: Any = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = Field(
        None, description="null only for an assistant message (read as empty text)")
    name: str | None = None
    tool_calls: Any = None
    tool_call_id: Any = None


class ChatRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_INT32)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None


# ---- bytes -> model ------------------------------------------------------------------------------------------
def parse(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """A request body -> a validated `model`, or APIError(400) saying what is wrong and where."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, an int of too many digits, deep nesting
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise APIError(400, "the request body must be a JSON object")
    if "\\ud" in text or "\\uD" in text:  # only a \u escape can make a lone surrogate
        _check_unicode(obj, [])
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        param = _param(first.get("loc", ()))
        msg = first.get("msg", "invalid value")
        raise APIError(400, f"invalid value for '{param}': {msg}" if param else msg, param) from None


def _check_unicode(obj, path: list) -> None:
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            p = ".".join(map(str, path)) or None
            raise APIError(400, f"'{p}' holds a lone surrogate (\\ud800-\\udfff): not valid Unicode text",
                           p) from None
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_unicode(k, path)
            _check_unicode(v, [*path, k])
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_unicode(v, [*path, i])


def _param(loc) -> str | None:
    # the field path, without pydantic's union-member labels ("str", "list[int]", "TextPart", "constrained-int")
    keep = [str(p) for p in loc if isinstance(p, int) or (
        p.isidentifier() and p.islower() and p not in ("str", "int", "float", "bool", "list", "dict", "none"))]
    return ".".join(keep) or None


# ---- model -> engine requests --------------------------------------------------------------------------------
@dataclass
class Prepared:
    """What the routes hand to the bridge: prompts, one SamplingParams per choice (prompt-major, n per prompt)."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    stops: list[str]
    n: int
    echo_text: list[str] = field(default_factory=list)  # per prompt, when echo is on


def sampling_fields(**values) -> SamplingFields:
    """Validate sampling values given outside HTTP (the CLI): ValueError naming the field when one is invalid."""
    try:
        return SamplingFields.model_validate(values)
    except ValidationError as e:
        first = e.errors()[0]
        raise ValueError(f"invalid {_param(first.get('loc', ())) or 'value'}: {first.get('msg')}") from None


def to_sampling_params(f: SamplingFields, limits: Limits, longest_prompt: int, *, max_tokens: int | None,
                       default_max_tokens: int | None, prompt_param: str = "prompt", logprobs: int | None = None,
                       prompt_logprobs: int | None = None) -> SamplingParams:
    """Range-check what depends on the model (context, vocabulary) and build the engine's SamplingParams.
    max_tokens None takes default_max_tokens, or all the room the context leaves when that is None too."""
    if f.presence_penalty or f.frequency_penalty:
        param = "presence_penalty" if f.presence_penalty else "frequency_penalty"
        raise APIError(400, f"{param} is not implemented (only 0)", param)
    for s in f.stops():
        if len(s) > limits.max_stop_chars:
            raise APIError(400, f"a stop string may have at most {limits.max_stop_chars} characters", "stop")
    for t in f.stop_token_ids or ():
        if t >= limits.vocab_size:
            raise APIError(400, f"stop token ids must be in [0, {limits.vocab_size})", "stop_token_ids")
    ctx = limits.max_model_len
    only_prompt = max_tokens == 0
    if longest_prompt > ctx or (longest_prompt == ctx and not only_prompt):
        raise APIError(400, f"the prompt has {longest_prompt} tokens; this model's context is {ctx} tokens",
                       prompt_param, "context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(default_max_tokens or ctx, ctx - longest_prompt)
    if longest_prompt + max_tokens > ctx:
        raise APIError(400, f"max_tokens ({max_tokens}) + prompt ({longest_prompt} tokens) exceeds the context of "
                            f"{ctx} tokens", "max_tokens", "context_length_exceeded")
    ignore_eos = bool(f.ignore_eos)
    stop_ids = tuple(f.stop_token_ids or ()) + ((limits.eos_id,) if limits.eos_id is not None and not ignore_eos
                                                 else ())
    return SamplingParams(max_tokens=max_tokens, temperature=1.0 if f.temperature is None else f.temperature,
                          top_p=1.0 if f.top_p is None else f.top_p, top_k=max(f.top_k or 0, 0), seed=f.seed,
                          stop_token_ids=stop_ids, ignore_eos=ignore_eos, logprobs=logprobs,
                          prompt_logprobs=0 if only_prompt and prompt_logprobs is None else prompt_logprobs)


def _common(body: _Request, limits: Limits) -> None:
    if body.model not in limits.model_names:
        raise APIError(404, f"The model `{body.model}` does not exist; this server serves "
                            f"{', '.join(f'`{m}`' for m in limits.model_names)}", "model", "model_not_found")
    for name, accepted in _UNIMPLEMENTED.items():
        if name in type(body).model_fields and not accepted(getattr(body, name)):
            raise APIError(400, f"'{name}' is not implemented by this server", name, "unsupported_parameter")


def _choices(prompts: list[list[int]], params: SamplingParams, n: int, limits: Limits, param: str) -> list:
    total = len(prompts) * n
    if total > limits.max_choices:
        raise APIError(400, f"{len(prompts)} prompt(s) x n={n} = {total} sequences, more than the server's queue "
                            f"of {limits.max_choices} can ever hold", param, "too_many_sequences")
    out = []
    for i in range(total):  # n choices per prompt with seeds seed, seed + 1, ... (distinct samples, reproducible)
        seed = None if params.seed is None else (params.seed + i % n) % 2**64
        out.append(SamplingParams(**{**params.__dict__, "seed": seed}))
    return out


def prepare_completion(body: CompletionRequest, tokenizer, limits: Limits) -> Prepared:
    """/v1/completions: prompts (text or token ids) -> token ids, and one SamplingParams per choice."""
    _common(body, limits)
    n = body.n or 1
    if body.best_of is not None and body.best_of != n:
        raise APIError(400, "'best_of' is not implemented (only best_of = n)", "best_of", "unsupported_parameter")
    if body.suffix not in (None, ""):
        raise APIError(400, "'suffix' is not implemented by this server", "suffix", "unsupported_parameter")
    p, texts = body.prompt, None
    if isinstance(p, str) or (p and all(isinstance(x, str) for x in p)):
        texts = [p] if isinstance(p, str) else list(p)
        if not all(texts):
            raise APIError(400, "the prompt is empty", "prompt")
        # encode_batch releases the GIL (encode does not): a long prompt does not hold up the event loop. bos first
        # where the tokenizer puts it (as `dsv2 generate`, transformers and vLLM do); token-id prompts stay as sent
        prompts = tokenizer.encode_batch(texts, add_bos=tokenizer.adds_bos)
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    else:
        prompts = [list(x) for x in p]
    if not prompts or any(len(x) == 0 for x in prompts):
        raise APIError(400, "the prompt is empty", "prompt")
    if any(t < 0 or t >= limits.vocab_size for x in prompts for t in x):
        raise APIError(400, f"prompt token ids must be in [0, {limits.vocab_size})", "prompt")
    echo = bool(body.echo)
    if body.max_tokens == 0 and not echo:
        raise APIError(400, "max_tokens 0 needs echo: true (there is nothing else to return)", "max_tokens")
    params = to_sampling_params(body, limits, max(map(len, prompts)), max_tokens=body.max_tokens,
                                default_max_tokens=16, logprobs=body.logprobs,
                                prompt_logprobs=body.logprobs if echo else None)
    echo_text = (texts or [tokenizer.decode(x, skip_special_tokens=False) for x in prompts]) if echo else []
    return Prepared(prompts, _choices(prompts, params, n, limits, "prompt"), body.stops(), n, echo_text)


def chat_messages(body: ChatRequest) -> list[dict]:
    """The messages as the chat template reads them. developer -> system; an assistant's null content -> "";
    tool messages and tool calls are refused (no tools are implemented)."""
    out = []
    for i, m in enumerate(body.messages):
        if m.role == "tool":
            raise APIError(400, "messages with role 'tool' are not supported: this server implements no tools",
                           f"messages.{i}.role", "unsupported_parameter")
        if m.tool_calls not in (None, []):
            raise APIError(400, "tool_calls are not supported: this server implements no tools",
                           f"messages.{i}.tool_calls", "unsupported_parameter")
        if m.content is None and m.role != "assistant":
            raise APIError(400, f"a '{m.role}' message needs content", f"messages.{i}.content")
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or ())
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def prepare_chat(body: ChatRequest, template, limits: Limits) -> Prepared:
    """/v1/chat/completions: messages -> the chat template's token ids, and one SamplingParams per choice."""
    _common(body, limits)
    messages = chat_messages(body)
    try:
        prompt = template.encode(messages, add_generation_prompt=True)
    except Exception as e:  # a template that raises on these messages
        raise APIError(400, f"cannot apply the chat template: {e}", "messages") from None
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if body.max_tokens == 0:
        raise APIError(400, "max_tokens must be at least 1", "max_tokens")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = to_sampling_params(body, limits, len(prompt), max_tokens=max_tokens, default_max_tokens=None,
                                prompt_param="messages",
                                logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    n = body.n or 1
    return Prepared([prompt], _choices([prompt], params, n, limits, "n"), body.stops(), n)
