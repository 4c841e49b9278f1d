"""8-bit KV-cache entries for the MLA latent cache (c_KV, 512 wide in V2, and the rotated k_rope, 64 wide).

One absmax scale per cached vector. This is our own format, not a DeepSeek one (FP8 weights, DeepSeek's format,
are dsv2.model.fp8). Scales are float32: they cost 32/512 = 0.0625 extra bits per element for c_KV (0.5 for
k_rope), and bf16 scales would add a 2^-9 relative error to every entry for a saving that small.
"""

from __future__ import annotations

import torch

from dsv2.model.fp8 import FP8_DTYPE, FP8_MAX, fp8_to_float32

INT8_MAX = 127.0

KV_QUANT_KINDS = ("fp8", "int8")
KV_CACHE_KINDS = (None, "bf16", "fp16", "fp32") + KV_QUANT_KINDS


def _check_kv_kind(kind, allowed) -> None:
    if kind not in allowed:
        raise ValueError(f"unknown KV cache kind {kind!r}; allowed: {list(allowed)}")


def quantize_kv(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each last-dim vector of x [..., dim] with its own absmax scale.

    Returns q [..., dim] (int8 or float8_e4m3fn) and scale float32 [..., 1]; x ~= q.float() * scale.
    int8 is symmetric: scale = amax / 127, q = round(x / scale) in [-127, 127]. fp8: scale = amax / 448.
    An all-zero vector gets scale 1.
    """
    _check_kv_kind(kind, KV_QUANT_KINDS)
    xf = x.float()
    qmax = INT8_MAX if kind == "int8" else FP8_MAX
    scale = xf.abs().amax(dim=-1, keepdim=True) / qmax  # [..., 1]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = (xf / scale).clamp_(-qmax, qmax)
    q = y.round_().to(torch.int8) if kind == "int8" else y.to(FP8_DTYPE)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [..., dim] in `dtype` = q.float() * scale (scale [..., 1])."""
    return (fp8_to_float32(q) * scale.float()).to(dtype)


def kv_bits_per_element(kind: str | None, dim: int, scale_dtype: torch.dtype = torch.float32) -> float:
    """Storage bits per cached number: 16 for None/"bf16"/"fp16", 32 for "fp32", and for "fp8"/"int8"
    8 plus one scale of `scale_dtype` shared by `dim` numbers (8.0625 for dim 512, 8.5 for dim 64)."""
    _check_kv_kind(kind, KV_CACHE_KINDS)
    if kind in (None, "bf16", "fp16"):
        return 16.0
    if kind == "fp32":
        return 32.0
    return 8.0 + torch.finfo(scale_dtype).bits / dim
