"""MLA: the absorbed path over the latent cache equals the naive path; cached decode equals full recompute."""

import pytest
import torch

from dsv2 import DeepseekV2, ModelConfig, generate
from dsv2.config import yarn_scaling


def _model(**kw):
    return DeepseekV2(ModelConfig.from_preset("tiny", initializer_range=0.15, **kw)).eval()


@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": None}, {"rope_scaling": yarn_scaling(factor=4.0, original_max=32)}])
@torch.no_grad()
def test_prefill_then_decode_matches_full_recompute(kw):
    model = _model(**kw)
    ids = torch.randint(0, 512, (2, 24))
    full = model(ids)  # [2, 24, V], no cache
    for impl in ("auto", "naive", "absorb"):
        model.attn_impl = impl
        cache = model.new_cache(2, 32)
        prefill = model(ids[:, :16], cache=cache)
        steps = [model(ids[:, t:t + 1], cache=cache) for t in range(16, 24)]
        got = torch.cat([prefill] + steps, dim=1)
        assert (got - full).abs().max() < 1e-5, impl
        assert cache.lengths.tolist() == [24, 24]


@torch.no_grad()
def test_chunked_prefill_with_absorbed_path():
    model = _model()
    ids = torch.randint(0, 512, (1, 30))
    full = model(ids)
    model.attn_impl = "absorb"
    cache = model.new_cache(1, 30)
    chunks = [model(ids[:, s:s + 10], cache=cache) for s in (0, 10, 20)]
    assert (torch.cat(chunks, dim=1) - full).abs().max() < 1e-5


@torch.no_grad()
def test_absorbed_decode_never_expands_kv():
    """The absorbed path must not call kv_b_proj as a layer (that is what materialises per-head K/V)."""
    model = _model()
    calls = []
    for layer in model.model.layers:
        layer.self_attn.kv_b_proj.register_forward_hook(lambda *a: calls.append(1))
    cache = model.new_cache(1, 20)
    model.attn_impl = "absorb"
    model(torch.randint(0, 512, (1, 8)), cache=cache)
    model(torch.randint(0, 512, (1, 1)), cache=cache)
    assert calls == []
    model.attn_impl = "naive"
    model(torch.randint(0, 512, (1, 1)), cache=cache)
    assert len(calls) == model.config.num_hidden_layers


def test_cache_holds_only_latent_and_rope_key():
    model = _model()
    cfg = model.config
    cache = model.new_cache(3, 50)
    per_token = cache.nbytes() / (3 * 51 * cfg.num_hidden_layers * 4)  # 51: one spare slot per row, fp32
    assert per_token == cfg.kv_lora_rank + cfg.qk_rope_head_dim


@torch.no_grad()
def test_right_padded_prefill_with_ragged_lengths():
    model = _model()
    a, b = torch.randint(0, 512, (1, 12)), torch.randint(0, 512, (1, 5))
    ids = torch.zeros(2, 12, dtype=torch.long)
    ids[0], ids[1, :5] = a[0], b[0]
    cache = model.new_cache(2, 20)
    out = model(ids, cache=cache, input_lengths=torch.tensor([12, 5]))
    assert (out[0] - model(a)[0]).abs().max() < 1e-5
    assert (out[1, :5] - model(b)[0]).abs().max() < 1e-5
    # one decode step each: row 1 continues at its own position 5
    nxt = torch.tensor([[7], [9]])
    step = model(nxt, cache=cache, input_lengths=torch.tensor([1, 1]))
    assert (step[1, 0] - model(torch.cat([b, nxt[1:]], dim=1))[0, -1]).abs().max() < 1e-5
    assert cache.lengths.tolist() == [13, 6]


def test_cache_overflow_is_a_clear_error():
    model = _model()
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="past the cache"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)


def test_generate_batched_equals_one_by_one_and_recompute():
    model = _model()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    batched = generate(model, prompts, max_new_tokens=10)
    assert batched == [generate(model, [p], max_new_tokens=10)[0] for p in prompts]
    for p, new in zip(prompts, batched):
        ids = list(p)
        for _ in range(10):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert ids[len(p):] == new


def test_generate_sampling_is_seeded_and_stops_at_eos():
    model = _model()
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(model, prompts, 12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    assert a == generate(model, prompts, 12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    assert a != generate(model, prompts, 12, temperature=1.0, top_p=0.9, top_k=50, seed=8)
    eos = generate(model, prompts, 12)[0][3]
    stopped = generate(model, prompts, 12, eos_token_id=eos)
    assert stopped[0][-1] == eos and len(stopped[0]) <= 4
    with pytest.raises(ValueError):
        generate(model, [[]], 4)


@pytest.mark.parametrize("emulated", [True, False])
@torch.no_grad()
def test_bf16_absorbed_weight_products_run_in_float32_where_cpu_bf16_is_emulated(monkeypatch, emulated):
    """On CPUs without native bf16 (AVX2), W_UK / W_UV are applied in float32 from a float32 copy kept between steps
    (bf16 batched matmuls at one row are several times slower there); with native bf16 they stay bf16. Either way
    bf16 decode stays close to the float32 model, and a weight update (training between generations) is seen."""
    import dsv2.model.attention as att

    monkeypatch.setattr(att, "_cpu_bf16_is_emulated", lambda: emulated)
    model = _model()
    ids = torch.randint(0, 512, (2, 12))
    want = model(ids)[:, -1]
    model = model.bfloat16()
    model.attn_impl = "absorb"
    cfg = model.config
    w_shapes = {(cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank),  # W_UK
                (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.v_head_dim)}  # W_UV^T
    calls, bmm = [], torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b, **k: calls.append((a.dtype, b.dtype, tuple(b.shape)))
                        or bmm(a, b, **k))
    cache = model.new_cache(2, 16)
    model(ids[:, :11], cache=cache)
    got = model(ids[:, 11:], cache=cache)[:, -1].float()
    weight_products = [(a, b) for a, b, shape in calls if shape in w_shapes]
    assert len(weight_products) == 2 * 2 * cfg.num_hidden_layers  # two per layer, in prefill and in decode
    assert set(weight_products) == {(torch.float32, torch.float32) if emulated else (torch.bfloat16, torch.bfloat16)}
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    attn = model.model.layers[0].self_attn
    w_uk = attn.absorbed_weights(torch.float32)[0]
    assert attn.absorbed_weights(torch.float32)[0] is w_uk  # kept between steps
    attn.kv_b_proj.weight.mul_(2)  # an in-place update (an optimizer step) must not leave a stale copy
    assert torch.allclose(attn.absorbed_weights(torch.float32)[0], 2 * w_uk)
