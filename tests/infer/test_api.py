"""The server's request validation without HTTP (dsv2.infer.api): every numeric field range-checked on arrival,
OpenAI-shaped errors naming the field, unimplemented fields refused by name, the mapping to SamplingParams, and the
CLI's generate/chat flags going through the same validation."""

from __future__ import annotations

import argparse
import json

import pytest

from dsv2.infer.api import (APIError, ChatRequest, CompletionRequest, Limits, parse, prepare_chat,
                            prepare_completion)
from dsv2.infer.cli import _sampling_fields
from dsv2.infer.text import ChatTemplate
from dsv2.tokenizer import Tokenizer

LIMITS = Limits(("m", "alias"), max_model_len=64, vocab_size=512, max_choices=8, eos_id=1, max_stop_chars=10)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


def _completion(tok, **fields):
    raw = json.dumps({"model": "m", "prompt": "def f(x):", **fields}).encode()
    return prepare_completion(parse(raw, CompletionRequest), tok, LIMITS)


def _err(fn, *a, **kw) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*a, **kw)
    return e.value


# (field, value) -> 400 naming the field: each one out of its range, on arrival
OUT_OF_RANGE = [
    ("top_k", 2**70), ("top_k", -2), ("seed", 2**64), ("seed", -2**63 - 1), ("temperature", 2.01),
    ("temperature", -1e-9), ("top_p", 0), ("top_p", 1.0001), ("max_tokens", -1), ("max_tokens", 2**31),
    ("n", 0), ("n", 17), ("logprobs", 21), ("logprobs", -1), ("stop_token_ids", [2**31]),
    ("stop_token_ids", [-1]), ("stop_token_ids", [600]), ("presence_penalty", 3), ("frequency_penalty", 0.5),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", "x" * 11), ("best_of", 3), ("temperature", "1"),
    ("n", 1.0), ("echo", 1),
]


@pytest.mark.parametrize("field,value", OUT_OF_RANGE)
def test_numeric_fields_are_range_checked_on_arrival(tok, field, value):
    e = _err(_completion, tok, **{field: value})
    assert e.status == 400 and e.param.split(".")[0] == field, (e.param, e.message)
    assert e.body()["error"]["type"] == "invalid_request_error"


def test_too_many_stop_strings_say_so(tok):
    assert "at most 4 stop strings are allowed, got 5" in _err(_completion, tok, stop=list("abcde")).message


def test_values_at_the_edges_are_accepted(tok):
    p = _completion(tok, top_k=2**31 - 1, seed=2**64 - 1, temperature=2, top_p=1e-9, n=2, logprobs=20,
                    stop=["abcdefghij"], stop_token_ids=[511]).params
    assert [q.seed for q in p] == [2**64 - 1, 0]  # n choices: seed, seed + 1 (mod 2**64)
    assert p[0].top_k == 2**31 - 1 and p[0].stop_token_ids == (511, 1)  # eos is a stop token unless ignore_eos
    for q in p:
        q.validate()  # what arrives valid is valid for the engine too
    assert _completion(tok, top_k=-1).params[0].top_k == 0  # vLLM's "off"
    assert _completion(tok, max_tokens=None, temperature=None).params[0].max_tokens == 16  # null: the default
    assert _completion(tok, ignore_eos=True).params[0].stop_token_ids == ()


BAD_BODIES = [
    (b"\xff\xfe{}", None, "UTF-8"),
    (b'{"model": "m", "prompt": "\\ud800"}', "prompt", "surrogate"),
    (b'{"model": "m", "prompt": ["ok", "\\udfff"]}', "prompt.1", "surrogate"),
    (b'{"model": "m", "prompt": "hi", "temperature": NaN}', "temperature", "finite"),
    (b'{"model": "m", "prompt": "hi", "seed": 1' + b"0" * 5000 + b"}", None, "JSON"),
    (b"[1, 2]", None, "JSON object"),
    (b'{"model": "m", "prompt": "hi"', None, "JSON"),
]


@pytest.mark.parametrize("raw,param,says", BAD_BODIES)
def test_bad_bodies_are_400_naming_what(raw, param, says):
    e = _err(parse, raw, CompletionRequest)
    assert e.status == 400 and e.param == param and says.lower() in e.message.lower(), e.message


def test_valid_surrogate_pairs_and_unicode_pass():
    body = parse(b'{"model": "m", "prompt": "\\ud83d\\ude00 caf\\u00e9"}', CompletionRequest)
    assert body.prompt == "\U0001f600 café"


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("response_format", {"type": "json_object"}),
    ("logit_bias", {"5": 10}), ("parallel_tool_calls", True)])
def test_unimplemented_fields_are_refused_by_name(tok, field, value):
    e = _err(_completion, tok, **{field: value})
    assert e.status == 400 and e.param == field and "not implemented" in e.message
    chat = parse(json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value}).encode(),
                 ChatRequest)
    assert _err(prepare_chat, chat, ChatTemplate(tok), LIMITS).param == field


def test_unimplemented_fields_at_their_default_are_accepted(tok):
    _completion(tok, tools=[], tool_choice="none", response_format={"type": "text"}, logit_bias={}, suffix="",
                best_of=1, user="someone")
    assert _err(_completion, tok, suffix="end").param == "suffix"


def _chat(tok, messages, **fields):
    body = parse(json.dumps({"model": "alias", "messages": messages, **fields}).encode(), ChatRequest)
    return prepare_chat(body, ChatTemplate(tok), LIMITS)


def test_chat_roles_documented_behaviour(tok):
    a = _chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                    {"role": "user", "content": "again"}])
    b = _chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""},
                    {"role": "user", "content": "again"}])
    assert a.prompts == b.prompts  # an assistant's null content is empty text
    e = _err(_chat, tok, [{"role": "tool", "content": "42", "tool_call_id": "x"}])
    assert e.status == 400 and e.param == "messages.0.role" and "tool" in e.message
    e = _err(_chat, tok, [{"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}])
    assert e.param == "messages.0.tool_calls"
    assert _err(_chat, tok, [{"role": "user", "content": None}]).param == "messages.0.content"
    assert _err(_chat, tok, [{"role": "user", "content": "hi"}], max_tokens=0).param == "max_tokens"


def test_limits_are_named(tok):
    e = _err(_completion, tok, prompt=["a"] * 5, n=2)  # 10 sequences, the queue holds 8
    assert e.status == 400 and "queue of 8" in e.message and e.code == "too_many_sequences"
    e = _err(_completion, tok, prompt=list(range(64)))
    assert e.code == "context_length_exceeded" and "64" in e.message
    e = _err(_completion, tok, prompt=list(range(40)), max_tokens=30)
    assert e.param == "max_tokens" and e.code == "context_length_exceeded"
    assert _err(_completion, tok, model="gpt-4").status == 404
    assert _err(_completion, tok, prompt=[[3, 600]]).param == "prompt"
    assert _err(_completion, tok, max_tokens=0).param == "max_tokens"  # 0 only with echo
    p = _completion(tok, prompt=list(range(64)), max_tokens=0, echo=True, logprobs=2)  # the whole context: ok
    assert p.params[0].max_tokens == 0 and p.params[0].prompt_logprobs == 2


def test_cli_flags_go_through_the_same_validation():
    def args(**kw):
        base = dict(temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=[], max_tokens=8)
        return argparse.Namespace(**{**base, **kw})

    _sampling_fields(args())
    for kw, flag in [({"top_p": 0.0}, "--top-p"), ({"top_k": 2**70}, "--top-k"), ({"seed": 2**64}, "--seed"),
                     ({"temperature": 3.0}, "--temperature"), ({"max_tokens": 0}, "--max-tokens"),
                     ({"stop": ["a"] * 5}, "--stop")]:
        with pytest.raises(ValueError, match=flag):
            _sampling_fields(args(**kw))
