"""Tests for dsv2.infer.quant: per-vector int8/fp8 quantization of the MLA latent KV cache, alone and read back
through the paged pool of a trained model."""

import pytest
import torch
from infer_models import byte_prompts

from dsv2.infer.paged import logits_through_pool
from dsv2.infer.quant import dequantize_kv, kv_bits_per_element, quantize_kv
from dsv2.model.fp8 import FP8_DTYPE

# e4m3 has 3 mantissa bits: round-to-nearest errs by at most 2^-4 relative for normal numbers; below the
# smallest normal (2^-6 in quantized units) the grid step is 2^-9, so the absolute error is at most 2^-10.
E4M3_REL = 2.0**-4
E4M3_SUBNORMAL_ABS = 2.0**-10


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
