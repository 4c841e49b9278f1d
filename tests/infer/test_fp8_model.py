"""FP8 weights in the model: conversion, DeepSeek-layout FP8 checkpoints (save, load, quantize/dequantize on
load), experts dequantized only when used, and measured quality against full precision."""

import copy
import json

import pytest
import torch
from infer_models import byte_prompts, tiny_model
from safetensors import safe_open

from dsv2 import load_checkpoint, save_checkpoint
from dsv2.infer.engine import Engine, SamplingParams
from dsv2.infer.paged import logits_through_pool
from dsv2.infer.fp8_model import FP8RoutedExperts, convert_model_fp8, is_fp8, weight_nbytes
from dsv2.infer.quant import FP8_QUANT_CONFIG, FP8Linear, dequantize_fp8_blockwise, fp8_to_float32


@pytest.fixture(scope="module")
def pair():
    dense = tiny_model()
    return dense, convert_model_fp8(copy.deepcopy(dense))


def test_conversion_keeps_lm_head_and_router_dense(pair):
    dense, fp8 = pair
    assert isinstance(fp8.lm_head, torch.nn.Linear) and not isinstance(fp8.lm_head, FP8Linear)
    layer = fp8.model.layers[1]
    assert isinstance(layer.self_attn.kv_b_proj, FP8Linear)
    assert isinstance(layer.mlp.experts, FP8RoutedExperts)
    assert layer.mlp.gate.weight.dtype == torch.float32
    assert layer.mlp.experts.w13.dtype == torch.float8_e4m3fn
    assert weight_nbytes(fp8) < 0.5 * weight_nbytes(dense)
    cast = copy.deepcopy(fp8).to(torch.bfloat16)  # dtype casts leave FP8 storage and scales alone
    experts = cast.model.layers[1].mlp.experts
    assert experts.w13.dtype == torch.float8_e4m3fn and experts.w13_scale_inv.dtype == torch.float32
    assert torch.equal(experts.w13.view(torch.uint8), layer.mlp.experts.w13.view(torch.uint8))


def test_experts_dequantize_only_active(pair):
    _, fp8 = pair
    experts = fp8.model.layers[1].mlp.experts
    E = experts.w13.shape[0]
    counts = torch.zeros(E, dtype=torch.long)
    counts[[1, 4]] = torch.tensor([3, 2])
    x = torch.randn(5, experts.w13.shape[2])
    w = torch.rand(5)
    got = experts(x, counts, w)
    # reference: the same weights dequantized per expert (gate and up blocks separately), run densely
    w13, w2 = experts.weights()
    ref = []
    for e, rows in ((1, slice(0, 3)), (4, slice(3, 5))):
        g, u = (x[rows] @ w13[e].float().T).chunk(2, dim=-1)
        ref.append((torch.nn.functional.silu(g) * u * w[rows, None]) @ w2[e].float().T)
    assert torch.allclose(got, torch.cat(ref), atol=1e-2, rtol=1e-2)  # bf16 dequantization of reference weights
    gate = dequantize_fp8_blockwise(experts.w13[1, :16], experts.w13_scale_inv[1, :1], dtype=torch.float32)
    assert torch.equal(experts.weights()[0][1, :16].float(), gate.bfloat16().float())


def test_fp8_checkpoint_round_trip(pair, tmp_path):
    dense, fp8 = pair
    save_checkpoint(dense, tmp_path / "dense")
    save_checkpoint(fp8, tmp_path / "fp8")
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert cfg["quantization_config"] == FP8_QUANT_CONFIG
    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        # DeepSeek's FP8 layout: fp8 weight + float32 block scales, per expert; router and lm_head unquantized
        w = f.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight")
        s = f.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight_scale_inv")
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (1, 1)
        assert f.get_tensor("model.layers.0.self_attn.kv_b_proj.weight").dtype == torch.float8_e4m3fn
        assert "lm_head.weight_scale_inv" not in names and "model.layers.1.mlp.gate.weight_scale_inv" not in names
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        want = fp8(ids)
        stored = load_checkpoint(tmp_path / "fp8")  # as stored: FP8 modules
        assert is_fp8(stored) and torch.equal(stored(ids), want)
        on_load = load_checkpoint(tmp_path / "dense", fp8=True)  # quantized while loading
        assert is_fp8(on_load) and torch.equal(on_load(ids), want)
        deq = load_checkpoint(tmp_path / "fp8", fp8=False, dtype=torch.float32)  # dequantized to a dense model
        assert not is_fp8(deq) and torch.equal(deq(ids), want)
        assert not is_fp8(load_checkpoint(tmp_path / "dense"))


def test_fp8_quality_on_trained_model(trained_tiny):
    """Stated tolerance on a (briefly) trained tiny model: FP8 weights agree with full precision on >= 90% of
    next-token argmaxes over 512 positions, and log-probabilities differ by < 0.5 nats at most."""
    fp8 = convert_model_fp8(copy.deepcopy(trained_tiny))
    ids = torch.tensor(byte_prompts(4, 128, seed=3))
    with torch.no_grad():
        ref, got = trained_tiny(ids).log_softmax(-1), fp8(ids).log_softmax(-1)
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
    assert (ref - got).abs().max().item() < 0.5 * max(1.0, ref.abs().max().item() / 10)


@pytest.mark.parametrize("kind,min_agree,max_diff", [("int8", 0.97, 0.5), ("fp8", 0.9, 1.5)])
def test_kv_cache_quality_on_trained_model(trained_tiny, kind, min_agree, max_diff):
    """Stated tolerance: with every key read back through an 8-bit latent cache (teacher-forced over 4 x 128
    held-out tokens), next-token argmaxes agree with the float32 cache on >= 97% (int8) / 90% (fp8) of positions
    and no logit moves by more than 0.5 / 1.5."""
    ids = torch.tensor(byte_prompts(4, 128, seed=5))
    ref = logits_through_pool(trained_tiny, ids)
    got = logits_through_pool(trained_tiny, ids, kind)
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert agree >= min_agree, agree
    assert (ref - got).abs().max().item() < max_diff


def test_engine_runs_fp8_model(pair):
    _, fp8 = pair
    out = Engine(fp8, num_blocks=16, eos_token_id=None).generate([[5, 6, 7]], SamplingParams(max_tokens=4))
    assert len(out[0].token_ids) == 4


def test_fp8_table_conversion_is_exact():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)  # every e4m3 value, NaNs included
    assert torch.equal(fp8_to_float32(codes).nan_to_num(7.0), codes.float().nan_to_num(7.0))
    w = torch.randn(4, 6, 10).to(torch.float8_e4m3fn)[:, 1:5]  # non-contiguous
    assert torch.equal(fp8_to_float32(w), w.float())
