"""The engine's fast decode step agrees with the model's general forward over the same paged cache."""

import copy

import pytest
import torch
from infer_models import tiny_model

import dsv2.infer.decode as decode
from dsv2.config import yarn_scaling
from dsv2.infer.decode import FastDecoder
from dsv2.infer.engine import Engine, SamplingParams
from dsv2.infer.fp8_model import convert_model_fp8
from dsv2.infer.paged import PagedBatch, PagedLatentPool

VARIANTS = {
    "tiny": {},
    "no q_lora": {"q_lora_rank": None},
    "yarn": {"rope_scaling": yarn_scaling(factor=4.0, original_max=32)},
    "greedy routing, normalised, no shared": {"topk_method": "greedy", "n_group": 1, "topk_group": 1,
                                              "norm_topk_prob": True, "n_shared_experts": 0},
    "scaled routing": {"routed_scaling_factor": 2.5},
    "dense only": {"n_routed_experts": 0, "first_k_dense_replace": 3},
}


def _step_both(model, prompts, kv_dtype=None):
    """Prefill prompts of different lengths into a pool, then one decode step each way from the same state."""
    cfg = model.config
    pool = PagedLatentPool(cfg, num_blocks=32, block_size=4, kv_dtype=kv_dtype, dtype=model.lm_head.weight.dtype)
    tables, lengths = [], []
    for p in prompts:
        blocks = pool.allocate(pool.blocks_for(len(p) + 1))
        batch = PagedBatch(pool, [blocks], [0])
        with torch.no_grad():
            model(torch.tensor([p]), cache=batch)
        tables.append(blocks)
        lengths.append(len(p))
    tokens = torch.tensor([p[-1] for p in prompts])
    saved = pool.cache.clone()
    with torch.no_grad():
        want = model(tokens[:, None], cache=PagedBatch(pool, tables, lengths))[:, 0]
    written = pool.cache.clone()
    pool.cache.copy_(saved)
    got = FastDecoder(model)(tokens, PagedBatch(pool, tables, lengths))
    return want, got, written, pool.cache


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("lengths", [(7,), (3, 9, 14, 1)])
def test_fast_decode_matches_model_forward(name, lengths):
    model = tiny_model(**VARIANTS[name])
    g = torch.Generator().manual_seed(len(lengths))
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]
    want, got, cache_want, cache_got = _step_both(model, prompts)
    assert (want - got).abs().max() < 1e-4
    assert torch.allclose(cache_want, cache_got, atol=1e-5)  # the same latents land in the same slots


def test_expert_loop_and_grouped_paths_agree(monkeypatch):
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 8, 2, 11, 6, 3)]
    monkeypatch.setattr(decode, "LOOP_MAX_ACTIVE_EXPERTS", 0)
    grouped = _step_both(model, prompts)[1]
    monkeypatch.setattr(decode, "LOOP_MAX_ACTIVE_EXPERTS", 1000)
    want, loop = _step_both(model, prompts)[:2]
    assert (grouped - want).abs().max() < 1e-4 and (loop - want).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["fp8 weights", "bf16", "int8 kv"])
def test_fast_decode_other_precisions(kind):
    model = tiny_model()
    kv = None
    if kind == "fp8 weights":
        model = convert_model_fp8(copy.deepcopy(model))
    elif kind == "bf16":
        model = copy.deepcopy(model).to(torch.bfloat16)
    else:
        kv = "int8"
    prompts = [[5, 9, 300, 41], [7, 7, 8]]
    want, got = _step_both(model, prompts, kv)[:2]
    tol = 0.05 if kind == "bf16" else 1e-4
    assert (want.float() - got.float()).abs().max() < tol * max(1.0, want.float().abs().max().item())


def test_engine_fast_and_general_decode_generate_the_same():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (4, 30, 12)]
    sp = SamplingParams(max_tokens=16)
    fast = Engine(model, num_blocks=64, eos_token_id=None).generate(prompts, sp)
    slow = Engine(model, num_blocks=64, eos_token_id=None, fast_decode=False).generate(prompts, sp)
    assert [o.token_ids for o in fast] == [o.token_ids for o in slow]


def test_weight_updates_show_through():
    """The decoder holds views of the parameters, not copies: in-place updates (an optimizer step) apply."""
    model = tiny_model()
    dec = FastDecoder(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    prompts = [[5, 6, 7, 8]]
    want, _ = _step_both(model, prompts)[:2]
    pool = PagedLatentPool(model.config, num_blocks=8, block_size=4)
    blocks = pool.allocate(2)
    with torch.no_grad():
        model(torch.tensor([prompts[0]]), cache=PagedBatch(pool, [blocks], [0]))
    got = dec(torch.tensor([8]), PagedBatch(pool, [blocks], [4]))
    assert (want - got).abs().max() < 1e-4
