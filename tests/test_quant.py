"""Tests for dsv2.infer.quant: FP8 128x128 block-scaled weights (DeepSeek's FP8 checkpoint layout),
FP8Linear, and per-vector int8/fp8 quantization of the MLA latent KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsv2.infer.quant import (
    FP8_DTYPE,
    FP8Linear,
    convert_to_fp8,
    dequantize_fp8_blockwise,
    dequantize_kv,
    fp8_linear_nbytes,
    kv_bits_per_element,
    quantize_fp8_blockwise,
    quantize_kv,
)

# e4m3 has 3 mantissa bits: round-to-nearest errs by at most 2^-4 relative for normal numbers; below the
# smallest normal (2^-6 in quantized units) the grid step is 2^-9, so the absolute error is at most 2^-10.
E4M3_REL = 2.0**-4
E4M3_SUBNORMAL_ABS = 2.0**-10


def _loop_dequant(w_fp8, scale_inv, block=128):
    """The published formula written plainly, one block at a time (reference for the vectorised code)."""
    out = torch.empty(w_fp8.shape, dtype=torch.float32)
    rows, cols = w_fp8.shape
    for i in range(math.ceil(rows / block)):
        for j in range(math.ceil(cols / block)):
            blk = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            out[blk] = w_fp8[blk].float() * scale_inv[i, j]
    return out


def _block_expand(scale_inv, shape, block=128):  # [..., R, C] -> [..., rows, cols]
    return scale_inv.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., : shape[-2], : shape[-1]]


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (3, 200, 300), (5, 7)])
def test_fp8_blockwise_roundtrip_error_bounds(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[-1])  # mixed magnitudes inside every block
    q, s = quantize_fp8_blockwise(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.dtype == torch.float32
    assert s.shape == (*shape[:-2], math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))
    d = dequantize_fp8_blockwise(q, s, dtype=torch.float32)
    err = (d - w).abs()
    s_full = _block_expand(s, shape)
    # Per element: normal-range rounding or subnormal step, plus float32 slack.
    assert torch.all(err <= E4M3_REL * w.abs() + E4M3_SUBNORMAL_ABS * s_full + 1e-6 * s_full)
    # Per block: the largest error is at most 2^-4 of the block's amax (= 448 * scale_inv).
    assert torch.all(err <= E4M3_REL * 448.0 * s_full)
    # RMS is far below the worst case.
    assert (err.norm() / w.norm()).item() < 0.03


def test_fp8_scale_layout_matches_published_format():
    # Block (1, 2) is 1000x larger than the rest: only scale_inv[1, 2] may see it.
    torch.manual_seed(1)
    w = torch.rand(200, 300) * 2 - 1
    w[128:, 256:] *= 1000
    w[0, 0] = 1.0  # pin block (0, 0)'s amax
    q, s = quantize_fp8_blockwise(w)
    assert s.shape == (2, 3)
    assert s[1, 2] > 500 * s[1, 1]
    assert torch.isclose(s[0, 0], torch.tensor(1.0 / 448))
    assert torch.equal(q[0, 0].float(), torch.tensor(448.0))  # block amax maps to the top of e4m3
    # Vectorised dequantization equals the plain per-block formula exactly.
    assert torch.equal(dequantize_fp8_blockwise(q, s, dtype=torch.float32), _loop_dequant(q, s))
    # Default output dtype is bf16: the float32 product, rounded once.
    assert torch.equal(dequantize_fp8_blockwise(q, s), _loop_dequant(q, s).bfloat16())


def test_fp8_stacked_experts_match_per_expert():
    torch.manual_seed(2)
    w = torch.randn(4, 200, 130)
    q, s = quantize_fp8_blockwise(w)
    assert s.shape == (4, 2, 2)
    for e in range(4):
        qe, se = quantize_fp8_blockwise(w[e])
        assert torch.equal(q[e].view(torch.uint8), qe.view(torch.uint8)) and torch.equal(s[e], se)
    d = dequantize_fp8_blockwise(q, s, dtype=torch.float32)
    assert torch.equal(d[3], _loop_dequant(q[3], s[3]))


def test_fp8_zero_block_and_bad_scale_shape():
    w = torch.randn(256, 256)
    w[:128, 128:] = 0
    q, s = quantize_fp8_blockwise(w)
    assert s[0, 1] == 1.0 and torch.isfinite(s).all()
    d = dequantize_fp8_blockwise(q, s, dtype=torch.float32)
    assert torch.all(d[:128, 128:] == 0) and torch.isfinite(d).all()
    with pytest.raises(ValueError, match="expected"):
        dequantize_fp8_blockwise(q, s[:, :1])


def test_fp8_linear_matches_dequantized_and_full_precision():
    torch.manual_seed(3)
    lin = nn.Linear(300, 200, bias=True)
    m = FP8Linear.from_linear(lin)
    x = torch.randn(2, 5, 300)
    w_deq = dequantize_fp8_blockwise(m.weight, m.weight_scale_inv, dtype=torch.float32)
    assert torch.equal(m(x), F.linear(x, w_deq, lin.bias))  # the reference path, bit for bit
    ref = lin(x)
    assert ((m(x) - ref).norm() / ref.norm()).item() < 0.03
    xb = x.bfloat16()
    yb = m(xb)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, F.linear(xb, m.dequantized_weight(torch.bfloat16), lin.bias.bfloat16()))
    # Row-chunked forward: same numbers up to matmul rounding; chunks round up to whole blocks.
    m.chunk_rows = 100
    assert torch.allclose(m(x), F.linear(x, w_deq, lin.bias), rtol=1e-5, atol=1e-5)
    assert "float8_e4m3fn" in repr(m) and "block=128x128" in repr(m)


def test_fp8_linear_holds_a_quarter_of_fp32():
    lin = nn.Linear(1024, 768, bias=False)
    m = FP8Linear.from_linear(lin)
    assert {n for n, _ in m.named_buffers()} == {"weight", "weight_scale_inv"}
    assert not any(p.requires_grad for p in m.parameters())
    fp32_bytes = lin.weight.numel() * 4
    assert m.nbytes() == fp8_linear_nbytes(768, 1024) == 768 * 1024 + 4 * 6 * 8
    assert 0.25 <= m.nbytes() / fp32_bytes < 0.2501
    # .to(dtype) must not widen the fp8 weight nor round the float32 scales.
    s = m.weight_scale_inv.clone()
    m.to(torch.bfloat16)
    assert m.weight.dtype == FP8_DTYPE and torch.equal(m.weight_scale_inv, s)


def test_fp8_linear_checkpoint_round_trip_and_from_quantized():
    torch.manual_seed(4)
    m = FP8Linear.from_linear(nn.Linear(300, 200, bias=False))
    sd = m.state_dict()
    assert sd["weight"].dtype == FP8_DTYPE and sd["weight_scale_inv"].shape == (2, 3)
    fresh = FP8Linear(300, 200)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 300)
    assert torch.equal(fresh(x), m(x))
    wrapped = FP8Linear.from_quantized(sd["weight"], sd["weight_scale_inv"])
    assert torch.equal(wrapped(x), m(x))
    with pytest.raises(ValueError):
        FP8Linear.from_quantized(sd["weight"], sd["weight_scale_inv"][:1])


def test_convert_to_fp8_skips_router_and_head():
    net = nn.Module()
    net.layers = nn.ModuleList([nn.ModuleDict({"up_proj": nn.Linear(8, 16), "gate": nn.Linear(8, 4)})])
    net.lm_head = nn.Linear(8, 32)
    convert_to_fp8(net)
    assert isinstance(net.layers[0]["up_proj"], FP8Linear)
    assert type(net.layers[0]["gate"]) is nn.Linear and type(net.lm_head) is nn.Linear


@pytest.mark.parametrize("dim", [512, 64])
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_kv_quant_roundtrip(kind, dim):
    torch.manual_seed(5)
    x = torch.randn(2, 7, dim) * torch.logspace(-2, 1, 7)[:, None]  # per-token magnitudes differ
    x[1, 3] = 0  # an all-zero vector
    q, scale = quantize_kv(x, kind)
    assert q.dtype == (torch.int8 if kind == "int8" else FP8_DTYPE) and q.shape == x.shape
    assert scale.shape == (2, 7, 1) and scale.dtype == torch.float32
    d = dequantize_kv(q, scale, torch.float32)
    err = (d - x).abs()
    assert torch.all(d[1, 3] == 0)
    if kind == "int8":
        assert torch.all(err <= scale / 2 * (1 + 1e-6))  # half a step of amax/127
        assert q.abs().max() <= 127
    else:
        assert torch.all(err <= E4M3_REL * x.abs() + (E4M3_SUBNORMAL_ABS + 1e-6) * scale)
    rel = (err.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30))[x.norm(dim=-1) > 0]
    assert rel.max() < (0.01 if kind == "int8" else 0.04)
    assert dequantize_kv(q, scale).dtype == torch.bfloat16
    assert torch.equal(quantize_kv(x.bfloat16(), kind)[1], quantize_kv(x.bfloat16().float(), kind)[1])


def test_kv_bits_per_element_and_bad_kind():
    assert kv_bits_per_element("int8", 512) == 8.0625
    assert kv_bits_per_element("fp8", 64) == 8.5
    assert kv_bits_per_element("fp8", 512, torch.bfloat16) == 8.03125
    assert kv_bits_per_element("bf16", 512) == kv_bits_per_element(None, 64) == 16
    assert kv_bits_per_element("fp32", 512) == 32
    # V2's latent cache per token per layer: 512 + 64 numbers; int8 halves it (scales included).
    total = 512 * kv_bits_per_element("int8", 512) + 64 * kv_bits_per_element("int8", 64)
    assert total / (576 * 16) == pytest.approx(0.5069, abs=1e-4)
    with pytest.raises(ValueError, match=r"\['fp8', 'int8'\]"):
        quantize_kv(torch.randn(4, 8), "int4")
    with pytest.raises(ValueError, match="allowed"):
        kv_bits_per_element("nf4", 512)
