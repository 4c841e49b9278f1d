"""Standard attention beside MLA (cfg.attention_type mha / gqa / mqa): shapes, the same cache protocol (dense cache,
paged pool, engine) against full recompute, parameter and cache-byte counts against hand formulas, an independent
attention reference, config and checkpoint round trips. MLA's own checks live in test_attention / test_parity."""

import json
import math

import pytest
import torch

from dsv2 import DeepseekV2, ModelConfig, load_checkpoint, save_checkpoint
from dsv2.infer.engine import Engine, SamplingParams
from dsv2.infer.paged import PagedLatentPool, kv_bytes_per_token, logits_through_pool
from dsv2.info import kv_cache_table
from dsv2.model import count_parameters
from dsv2.model.attention import GroupedQueryAttention
from dsv2.model.rope import apply_rope

VARIANTS = {"mha": {"attention_type": "mha"}, "gqa": {"attention_type": "gqa", "kv_heads": 2},
            "mqa": {"attention_type": "mqa"}}
KV_HEADS = {"mha": 4, "gqa": 2, "mqa": 1}  # tiny: 4 query heads


def _cfg(name, **kw):
    return ModelConfig.from_preset("tiny", initializer_range=0.15, **VARIANTS[name], **kw)


def _model(name, **kw):
    return DeepseekV2(_cfg(name, **kw)).eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward_shapes(name):
    model = DeepseekV2(_cfg(name)).train()
    cfg, (B, T) = model.config, (2, 12)
    logits = model(torch.randint(0, 512, (B, T)))
    assert logits.shape == (B, T, cfg.vocab_size)
    logits.float().logsumexp(-1).mean().backward()
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, GroupedQueryAttention) and not hasattr(attn, "kv_b_proj")
    G, dqk, dv, H, h = KV_HEADS[name], cfg.qk_head_dim, cfg.v_head_dim, cfg.num_attention_heads, cfg.hidden_size
    assert attn.k_proj.weight.grad.shape == (G * dqk, h) and attn.k_proj.weight.grad.abs().sum() > 0
    assert attn.v_proj.weight.grad.shape == (G * dv, h) and attn.v_proj.weight.grad.abs().sum() > 0
    assert attn.o_proj.weight.grad.shape == (h, H * dv)


@pytest.mark.parametrize("name", VARIANTS)
@torch.no_grad()
def test_attention_matches_an_independent_reference(name):
    """The module's output against attention written out here: explicit softmax, query head i reads KV head
    i // (H / G), keys [k_nope ; RoPE(k_rope)] per KV head, causal."""
    cfg = _cfg(name, q_lora_rank=None)
    model = DeepseekV2(cfg).eval()
    attn = model.model.layers[0].self_attn
    B, T, H, G = 2, 9, cfg.num_attention_heads, KV_HEADS[name]
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    x = torch.randn(B, T, cfg.hidden_size)
    ctx = model.step_context(torch.zeros(B, T, dtype=torch.long), None, None)
    got = attn(x, ctx)
    cos, sin = ctx.cos, ctx.sin
    q = (x @ attn.q_proj.weight.T).view(B, T, H, dn + dr)
    k = (x @ attn.k_proj.weight.T).view(B, T, G, dn + dr)
    v = (x @ attn.v_proj.weight.T).view(B, T, G, dv)
    q = torch.cat([q[..., :dn], apply_rope(q[..., dn:], cos, sin)], -1)
    k = torch.cat([k[..., :dn], apply_rope(k[..., dn:], cos, sin)], -1)
    out = torch.empty(B, T, H, dv)
    mask = torch.ones(T, T).tril().bool()
    for i in range(H):
        g = i // (H // G)
        s = torch.einsum("btd,bsd->bts", q[:, :, i], k[:, :, g]) / math.sqrt(dn + dr)
        out[:, :, i] = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v[:, :, g]
    want = out.flatten(2) @ attn.o_proj.weight.T
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("name", VARIANTS)
@torch.no_grad()
def test_cached_decode_equals_full_recompute(name):
    """Through the dense cache: prefill then token-by-token decode, and ragged rows (input_lengths); through the
    paged pool: chunked prefill (chunks of 5 over blocks of 4 tokens)."""
    model = _model(name)
    ids = torch.randint(0, 512, (2, 14))
    full = model(ids)
    cache = model.new_cache(2, 16)
    assert cache.rows.shape[-1] == KV_HEADS[name] * (model.config.qk_head_dim + model.config.v_head_dim)
    got = torch.cat([model(ids[:, :10], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(10, 14)],
                    dim=1)
    assert (got - full).abs().max() < 1e-5
    # ragged: row 0 has 7 tokens in the first step, row 1 has 10; then each decodes its own next tokens
    cache = model.new_cache(2, 16)
    first = model(ids[:, :10], cache=cache, input_lengths=[7, 10])
    assert (first[0, :7] - full[0, :7]).abs().max() < 1e-5 and (first[1] - full[1, :10]).abs().max() < 1e-5
    nxt = model(torch.stack([ids[0, 7:9], ids[1, 10:12]]), cache=cache)
    assert (nxt[0] - full[0, 7:9]).abs().max() < 1e-5 and (nxt[1] - full[1, 10:12]).abs().max() < 1e-5
    pooled = logits_through_pool(model, ids, chunk=5, block_size=4)
    assert (pooled - full).abs().max() < 1e-5


def test_paged_int8_rows_scale_keys_and_values_apart():
    """An 8-bit pool row keeps one scale for the keys and one for the values: small values next to large keys
    come back accurate (one scale over the whole row, or a split elsewhere, would round them away)."""
    cfg = _cfg("gqa")
    nk, nv = cfg.kv_cache_parts
    assert (nk, nv) == (2 * cfg.qk_head_dim, 2 * cfg.v_head_dim)
    pool = PagedLatentPool(cfg, num_blocks=2, block_size=4, kv_dtype="int8")
    rows = torch.cat([1000 * torch.randn(8, nk), 0.01 * torch.randn(8, nv)], dim=-1)
    pool.write(0, torch.arange(8), rows)
    back = pool.read(0, torch.tensor([[0, 1]]), 8)[0]
    for part in (slice(0, nk), slice(nk, nk + nv)):  # int8 rounding: at most half a step of the part's own scale
        step = rows[:, part].abs().amax(-1, keepdim=True) / 127
        assert ((back[:, part] - rows[:, part]).abs() <= step / 2 + 1e-9).all()


@torch.no_grad()
def test_engine_serves_a_variant_like_full_recompute():
    model = _model("gqa")
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (9, 2)]
    want = []
    for p in prompts:  # greedy by full recompute, no cache anywhere
        seq = list(p)
        for _ in range(5):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        want.append(seq[len(p):])
    engine = Engine(model, num_blocks=32, block_size=4, eos_token_id=None, prefill_chunk=4)
    out = engine.generate(prompts, SamplingParams(max_tokens=5))
    assert [o.token_ids for o in out] == want


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_and_cache_counts_match_formulas(name):
    cfg = _cfg(name)  # tiny: q_lora_rank 32
    h, H, G, L = cfg.hidden_size, cfg.num_attention_heads, KV_HEADS[name], cfg.num_hidden_layers
    dqk, dv, rq = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.q_lora_rank
    query = h * rq + rq + rq * H * dqk  # W_DQ, its RMSNorm, W_UQ (the same query path as MLA)
    want = query + h * G * dqk + h * G * dv + H * dv * h
    counts = count_parameters(cfg)
    assert all(row["attention"] == want for row in counts["layers"])
    mla = count_parameters(ModelConfig.from_preset("tiny"))
    mla_attn = query + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank \
        + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + dv) + H * dv * h
    assert mla["layers"][0]["attention"] == mla_attn
    assert counts["total"] - mla["total"] == L * (want - mla_attn)
    per_token = G * (dqk + dv)  # keys and values of every KV head
    assert cfg.kv_cache_dim == per_token
    assert kv_bytes_per_token(cfg, "bf16") == L * per_token * 2
    assert kv_bytes_per_token(cfg, "int8") == L * (per_token + 2 * 4)  # + one float32 scale for keys, one for values
    cache = DeepseekV2(cfg).new_cache(3, 10)
    assert cache.nbytes() == L * 3 * 11 * per_token * 4  # fp32, one spare slot per row
    row = kv_cache_table(cfg)[-1]
    assert row["elements_per_token"] == L * per_token and name.upper() in row["mechanism"]


def test_config_switch_round_trips_and_mla_config_is_unchanged(tmp_path):
    cfg = _cfg("gqa")
    hf = cfg.to_hf()
    assert hf["attention_type"] == "gqa" and hf["kv_heads"] == 2 and hf["num_key_value_heads"] == 2
    assert ModelConfig.from_hf(hf) == cfg
    mla = ModelConfig.from_preset("tiny").to_hf()
    assert "attention_type" not in mla and "kv_heads" not in mla and mla["num_key_value_heads"] == 4
    for bad in ({"attention_type": "gqa", "kv_heads": 3}, {"attention_type": "gqa"},
                {"attention_type": "mqa", "kv_heads": 1}, {"attention_type": "linear"}):
        with pytest.raises(ValueError, match="invalid model config"):
            ModelConfig.from_preset("tiny", **bad)


@pytest.mark.parametrize("name", ["mqa", "mha"])
@torch.no_grad()
def test_checkpoint_of_a_variant_loads_back(tmp_path, name):
    model = _model(name)
    save_checkpoint(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["attention_type"] == name
    back = load_checkpoint(tmp_path / "ckpt").eval()
    assert back.config == model.config
    ids = torch.randint(0, 512, (1, 8))
    assert torch.equal(back(ids), model(ids))
