"""Decoupled RoPE on interleaved pairs, with YaRN context extension (DeepSeek reference semantics).

RoPE rotates pairs (2i, 2i+1) of the rope slice, as a complex multiplication (DeepSeek's reference permutes the
slice then uses rotate-half; the dot products are identical). YaRN mixes interpolated and extrapolated
frequencies with a linear ramp over the correction range, scales cos/sin by
mscale(factor, mscale) / mscale(factor, mscale_all_dim) and the softmax scale by mscale(factor, mscale_all_dim)^2.

We follow DeepSeek-V2's reference code (`modeling_deepseek.py`, DeepseekV2YarnRotaryEmbedding and
DeepseekV2Attention), which defines the published checkpoints, including where it is surprising:
- Missing keys take the reference's defaults: mscale 1, mscale_all_dim 0, beta_fast 32, beta_slow 1,
  original_max_position_embeddings 4096. An explicit `mscale: 0` stays 0 (mscale(factor, 0) = 1), it does not
  fall back to 1. A key present with value null counts as missing (the reference would crash on it).
- The softmax mscale^2 applies whenever rope_scaling is set and has a non-zero mscale_all_dim, whatever its
  type (the reference checks `rope_scaling is not None`, not the type); the frequencies change only under yarn.
- The ramp's upper correction dim is clamped to d - 1 (the full rope dim), not d/2 - 1, as in the reference.
- DeepSeek-V3's inference/model.py applies YaRN only when max_seq_len > original_seq_len and has a single mscale;
  V2's checkpoints follow modeling_deepseek.py, which applies it whenever rope_scaling says yarn. So do we.

Deviation of transformers 4.57 (our test oracle): it applies only the cos/sin factor, not the softmax mscale^2
(transformers 5.24 applies both and matches us without a patch).
DeepSeek's published checkpoints were trained with both, so we apply both (see `softmax_scale`; tests/test_rope.py
checks all of this against an independent formulation).
"""

from __future__ import annotations

import math

import torch

from dsv2.config import ModelConfig


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_params(cfg: ModelConfig) -> dict | None:
    rs = cfg.rope_scaling
    if not rs or rs.get("type", rs.get("rope_type")) != "yarn":
        return None
    return rs


def _mscale_arg(rs: dict, key: str, default: float) -> float:
    v = rs.get(key)
    return default if v is None else float(v)


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [d/2] float32 on CPU, cos/sin multiplier)."""
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta
    # explicit device: the model may be built under `with torch.device("meta")`
    freq_extra = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d))
    rs = _yarn_params(cfg)
    if rs is None:
        if cfg.rope_scaling and cfg.rope_scaling.get("type", cfg.rope_scaling.get("rope_type")) == "linear":
            # plain position interpolation (DeepSeek's DeepseekV2LinearScalingRotaryEmbedding: t / factor)
            return freq_extra / float(cfg.rope_scaling["factor"]), 1.0
        return freq_extra, 1.0
    factor = float(rs["factor"])
    orig = int(rs.get("original_max_position_embeddings", 4096))
    beta_fast, beta_slow = float(rs.get("beta_fast", 32)), float(rs.get("beta_slow", 1))
    freq_inter = freq_extra / factor
    low = max(math.floor(_correction_dim(beta_fast, d, base, orig)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, d, base, orig)), d - 1)
    if high == low:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    inv_freq = freq_inter * ramp + freq_extra * (1 - ramp)
    m = (yarn_get_mscale(factor, _mscale_arg(rs, "mscale", 1.0))
         / yarn_get_mscale(factor, _mscale_arg(rs, "mscale_all_dim", 0.0)))
    return inv_freq, m


def softmax_scale(cfg: ModelConfig) -> float:
    """(qk_nope + qk_rope)^-0.5, times mscale(factor, mscale_all_dim)^2 whenever rope_scaling has a non-zero
    mscale_all_dim (any rope_scaling type, as DeepSeek's reference does)."""
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if rs:
        mscale_all_dim = _mscale_arg(rs, "mscale_all_dim", 0.0)
        if mscale_all_dim:
            m = yarn_get_mscale(float(rs.get("factor") or 1.0), mscale_all_dim)
            scale *= m * m
    return scale


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for given positions. Holds no parameters or buffers (so meta-device models need no fix-up);
    the frequencies are recomputed from the config and cached per device."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self._inv_freq_cpu, self.mscale = rope_frequencies(cfg)
        self._cache: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] int -> cos, sin [B, T, d/2] float32."""
        dev = positions.device
        inv = self._cache.get(dev)
        if inv is None:
            inv = self._cache[dev] = self._inv_freq_cpu.to(dev)
        angles = positions.to(torch.float32)[..., None] * inv  # [B, T, d/2]
        return angles.cos() * self.mscale, angles.sin() * self.mscale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cis: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Rotate interleaved pairs. x [B, T, H, d] (or [B, T, d]); cos/sin [B, T, d/2]. Computed in float32.

    cis (complex64 cos + i sin, [B, T, d/2], made once per forward) takes the fast path: one complex multiply on a
    view of x, 4 ops instead of 12 (what per-token decode pays for). torch.compile traces the real formulation.
    """
    if x.dim() == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        cis = None if cis is None else cis[:, :, None, :]
    if cis is not None and not torch.compiler.is_compiling():
        xf = (x if x.dtype == torch.float32 else x.float()).unflatten(-1, (-1, 2))
        try:
            xc = torch.view_as_complex(xf)  # a view when the pairs sit at even offsets and strides
        except RuntimeError:
            xc = torch.view_as_complex(xf.contiguous())
        out = torch.view_as_real(xc * cis).flatten(-2)
        return out if out.dtype == x.dtype else out.to(x.dtype)
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
