"""The engine under the server: a request that fails inside a running batch ends alone (the others go on, equal
to running alone), and prompt log-probs (echo) come from the prefill forward, equal to transformers' model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dsv2.infer.engine import Engine, SamplingParams
from infer_models import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from oracle import oracle_from_dsv2  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_model()


PROMPTS = [[5, 9, 23, 7], [11, 3, 40, 41, 42, 8, 2], [60, 61], [77, 78, 79, 80, 81]]


def _alone(model, prompt, params):
    return Engine(model, num_blocks=64, eos_token_id=None).generate([prompt], params)[0].token_ids


def test_a_request_failing_in_the_sampler_ends_alone(model):
    """Poison one running request (top_k beyond int64 makes the batched sampler raise, the bug once found) after
    it has started decoding beside three others."""
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=3)
    eng = Engine(model, num_blocks=64, eos_token_id=None)
    ids = [eng.add_request(p, SamplingParams(**{**params.__dict__, "seed": 3 + i})) for i, p in enumerate(PROMPTS)]
    got = {i: [] for i in ids}
    reasons = {}
    for _ in range(3):
        for o in eng.step():
            got[o.request_id] += o.token_ids
    eng.requests[ids[1]].params.top_k = 2**70  # passes nothing now: the engine must still isolate it
    while eng.has_work():
        for o in eng.step():
            got[o.request_id] += o.token_ids
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    assert reasons[ids[1]] == "error"
    for i, p in zip(ids, PROMPTS):
        if i != ids[1]:
            assert reasons[i] == "length"
            assert got[i] == _alone(model, p, SamplingParams(**{**params.__dict__, "seed": 3 + ids.index(i)}))
    assert eng.pool.num_free == eng.pool.num_blocks  # the failed request's blocks came back too


def test_a_request_failing_in_the_forward_ends_alone(model, monkeypatch):
    """A prefill forward that raises whenever one request's prompt is in it: only that request ends."""
    poison = 99
    prompts = PROMPTS + [[poison, 5, 6]]
    eng = Engine(model, num_blocks=64, eos_token_id=None, prefill_chunk=8)
    forward = type(model).forward

    def flaky(self, input_ids, *a, **kw):
        if input_ids.shape[1] > 1 and bool((input_ids == poison).any()):
            raise RuntimeError("injected failure")
        return forward(self, input_ids, *a, **kw)

    monkeypatch.setattr(type(model), "forward", flaky)
    out = eng.generate(prompts, SamplingParams(max_tokens=6))
    monkeypatch.undo()
    assert out[-1].finish_reason == "error" and out[-1].token_ids == []
    for p, r in zip(PROMPTS, out):
        assert r.finish_reason == "length" and r.token_ids == _alone(model, p, SamplingParams(max_tokens=6))
    assert eng.pool.num_free == eng.pool.num_blocks


@pytest.mark.parametrize("chunk", [512, 3])  # one prefill; prompts cut into chunks of 3 tokens
def test_prompt_logprobs_equal_transformers(model, tmp_path, chunk):
    hf = oracle_from_dsv2(model, tmp_path)
    prompts = [[5, 9, 23, 7, 100, 200, 3], [11, 3, 40, 41, 42, 8, 2, 9, 9, 9, 250]]
    eng = Engine(model, num_blocks=64, eos_token_id=None, prefill_chunk=chunk)
    out = eng.generate(prompts, [SamplingParams(max_tokens=0, prompt_logprobs=3),
                                 SamplingParams(max_tokens=2, prompt_logprobs=0, logprobs=0)])
    for p, r in zip(prompts, out):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].float().log_softmax(-1)  # [T, V]
        want = ref[torch.arange(len(p) - 1), torch.tensor(p[1:])]
        assert len(r.prompt_logprobs) == len(p) - 1  # the first token has none
        got = torch.tensor([lp for lp, _ in r.prompt_logprobs])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    top = out[0].prompt_logprobs
    for j, (_, k3) in enumerate(top):
        with torch.no_grad():
            ref = hf(torch.tensor([prompts[0][:j + 1]])).logits[0, -1].float().log_softmax(-1)
        assert [i for i, _ in k3] == ref.topk(3).indices.tolist()
    assert out[0].token_ids == [] and out[0].finish_reason == "length"  # max_tokens 0: the prompt only
    assert len(out[1].token_ids) == 2 and out[1].token_ids == _alone(model, prompts[1], SamplingParams(max_tokens=2))
    assert eng.pool.num_free == eng.pool.num_blocks


def test_a_failure_after_some_rows_sampled_keeps_their_seeded_streams(model, monkeypatch):
    """The batched sampler draws for every row, then fails because of one row: the retried rows draw again from
    their seeded generators as they were, so each still equals its run alone."""
    import dsv2.infer.engine as engine_mod

    real = engine_mod.sample_next

    def flaky(logits, temperature, top_k, top_p, generators):
        out = real(logits, temperature, top_k, top_p, generators)
        if bool((temperature == 0.77).any()):
            raise RuntimeError("injected failure after drawing")
        return out

    monkeypatch.setattr(engine_mod, "sample_next", flaky)
    params = [SamplingParams(max_tokens=8, temperature=0.9, seed=s) for s in (1, 2, 3)]
    params.append(SamplingParams(max_tokens=8, temperature=0.77, seed=4))
    out = Engine(model, num_blocks=64, eos_token_id=None).generate(PROMPTS, params)
    assert out[3].finish_reason == "error"
    monkeypatch.undo()
    for p, sp, r in zip(PROMPTS, params, out[:3]):
        assert r.finish_reason == "length" and r.token_ids == _alone(model, p, sp)
