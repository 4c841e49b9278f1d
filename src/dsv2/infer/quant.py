"""Quantization primitives: FP8 block-scaled weights and 8-bit KV-cache entries.

FP8 weights follow the layout of DeepSeek's published FP8 checkpoints (DeepSeek-V3 and later; config.json
`quantization_config` = FP8_QUANT_CONFIG below): a linear weight W [out, in] is stored as
  `weight`            float8_e4m3fn [out, in]
  `weight_scale_inv`  float32       [ceil(out/128), ceil(in/128)]
and W = weight.float() * weight_scale_inv, each scale covering one 128x128 block (edge blocks may be
partial). Dequantization multiplies in float32 and then casts, as DeepSeek's `weight_dequant` kernel does.
MoE experts stored stacked, [E, out, in], carry scales [E, ceil(out/128), ceil(in/128)].

KV quantization is for the MLA latent cache (c_KV, 512 wide in V2, and the rotated k_rope, 64 wide): one
absmax scale per cached vector. This is our own format, not a DeepSeek one. Scales are float32: they cost
32/512 = 0.0625 extra bits per element for c_KV (0.5 for k_rope), and bf16 scales would add a 2^-9 relative
error to every entry for a saving that small.

Depends on torch only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
INT8_MAX = 127.0
BLOCK = 128
# The config.json entry DeepSeek ships with its FP8 checkpoints (activations are quantized on the fly by
# their fp8_gemm kernel; we dequantize weights instead, see FP8Linear).
FP8_QUANT_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [BLOCK, BLOCK],
}


# ---------------------------------------------------------------------------------------------------------
# FP8 block-scaled weights
# ---------------------------------------------------------------------------------------------------------


def _scale_shape(shape: torch.Size, block: int) -> tuple[int, ...]:
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block), math.ceil(cols / block))


def _to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """[..., rows, cols] -> [..., rows/b, b, cols/b, b], zero-padded up to whole blocks."""
    *lead, rows, cols = w.shape
    pad_r, pad_c = -rows % block, -cols % block
    if pad_r or pad_c:
        w = F.pad(w, (0, pad_c, 0, pad_r))
    return w.reshape(*lead, (rows + pad_r) // block, block, (cols + pad_c) // block, block)


def _from_blocks(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of _to_blocks: [..., R, b, C, b] -> [..., rows, cols] (padding cut off), contiguous."""
    *lead, nr, b, nc, _ = w.shape
    return w.reshape(*lead, nr * b, nc * b)[..., :rows, :cols].contiguous()


def quantize_fp8_blockwise(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize W [..., out, in] to fp8 [..., out, in] and float32 scale_inv [..., ceil(out/b), ceil(in/b)].

    Per block: scale_inv = amax(|block|) / 448, q = block / scale_inv. An all-zero block gets scale_inv 1.
    """
    if w.dim() < 2:
        raise ValueError(f"expected a weight [..., out, in], got shape {tuple(w.shape)}")
    rows, cols = w.shape[-2:]
    wb = _to_blocks(w.float(), block)  # [..., R, b, C, b]
    amax = wb.abs().amax(dim=(-3, -1))  # [..., R, C]
    scale_inv = amax / FP8_MAX
    scale_inv = torch.where(scale_inv > 0, scale_inv, torch.ones_like(scale_inv))
    # The clamp guards rounding just above 448 (casts beyond the e4m3 range are not saturating everywhere).
    q = (wb / scale_inv[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return _from_blocks(q, rows, cols), scale_inv


_FP8_TABLE: dict[torch.device, torch.Tensor] = {}


def fp8_to_float32(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> float32, exactly as q.float(), through a 256-entry table: the CPU cast kernel is scalar
    (~5 ns per element), a table lookup ~6x faster. Other dtypes are just cast."""
    if q.dtype != FP8_DTYPE or q.device.type != "cpu":
        return q.float()
    table = _FP8_TABLE.get(q.device)
    if table is None:
        codes = torch.arange(256, dtype=torch.uint8, device=q.device)
        table = _FP8_TABLE[q.device] = codes.view(FP8_DTYPE).float()
    return table.index_select(0, q.reshape(-1).view(torch.uint8).int()).view(q.shape)


def dequantize_fp8_blockwise(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """W [..., out, in] in `dtype` = w_fp8.float() * scale_inv broadcast per block (product taken in float32)."""
    expected = _scale_shape(w_fp8.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(w_fp8.shape)} "
            f"with block {block}: expected {expected}"
        )
    rows, cols = w_fp8.shape[-2:]
    wb = _to_blocks(fp8_to_float32(w_fp8), block)  # a fresh float32 copy [..., R, b, C, b], safe to scale in place
    wb.mul_(scale_inv.float()[..., :, None, :, None])
    return _from_blocks(wb, rows, cols).to(dtype)



def apply_keeping_dtype(module: nn.Module, base_apply, fn, recurse: bool, names: tuple[str, ...]) -> nn.Module:
    """nn.Module._apply for modules holding quantized buffers `names` (fp8 weights, float32 scales).

    nn.Module.to(dtype) / .half() / .bfloat16() cast every floating-point tensor, float8 included: that would
    silently store the weight in bf16 (twice the memory) and round the scales. The quantized buffers are passed
    through fn as integer views, so they move between devices but keep their dtype.
    """
    stored = {name: module._buffers.pop(name) for name in names}
    try:
        base_apply(fn, recurse)
    finally:
        module._buffers.update(stored)
    carrier = {FP8_DTYPE: torch.uint8, torch.float32: torch.int32}
    for name, t in stored.items():
        module._buffers[name] = fn(t.view(carrier[t.dtype])).view(t.dtype)
    return module

class FP8Linear(nn.Module):
    """y = x @ W^T (+ bias) with W held as FP8 blocks plus float32 scales; no full-precision copy is kept.

    `weight` and `weight_scale_inv` are buffers (never trained) named as in DeepSeek's FP8 checkpoints, so
    `state_dict()` / `load_state_dict()` speak that format directly.

    forward() dequantizes W into x's dtype and calls F.linear; the dequantized weight lives only for the
    call. `chunk_rows` (None = whole weight at once) bounds that transient to chunk_rows x in: rows are
    dequantized and multiplied a chunk at a time (results then match the unchunked path to matmul rounding,
    not bit for bit). The same code runs on CUDA: we do not call torch._scaled_mm, whose per-tensor and
    rowwise scaling cannot express 128x128 weight blocks and whose block-scaled modes need activations
    quantized to FP8 in 1x128 groups (DeepSeek's fp8_gemm), which changes the numerics. A fused FP8 GEMM
    would be a separate fast path tested against this one.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        block: int = BLOCK,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.bfloat16,
        chunk_rows: int | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.chunk_rows = chunk_rows
        shape = torch.Size((out_features, in_features))
        self.register_buffer("weight", torch.zeros(shape, dtype=FP8_DTYPE, device=device))
        self.register_buffer(
            "weight_scale_inv", torch.ones(_scale_shape(shape, block), dtype=torch.float32, device=device)
        )
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_quantized(
        cls, weight: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None, block: int = BLOCK
    ) -> "FP8Linear":
        """Wrap checkpoint tensors (weight float8_e4m3fn [out, in], scale_inv [ceil(out/b), ceil(in/b)])."""
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise ValueError(f"expected a 2-D {FP8_DTYPE} weight, got {weight.dtype} {tuple(weight.shape)}")
        expected = _scale_shape(weight.shape, block)
        if tuple(scale_inv.shape) != expected:
            raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)}, expected {expected} for block {block}")
        out_features, in_features = weight.shape
        mod = cls(in_features, out_features, bias=bias is not None, block=block, device="meta")
        mod.weight = weight.detach()
        mod.weight_scale_inv = scale_inv.detach().float()
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: int = BLOCK) -> "FP8Linear":
        """Quantize an nn.Linear's weight blockwise; the bias (if any) is kept as it is."""
        weight, scale_inv = quantize_fp8_blockwise(linear.weight.detach(), block)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_quantized(weight, scale_inv, bias, block)

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """W [out, in] in `dtype` (e.g. for MLA weight absorption, which needs kv_b_proj's matrix)."""
        return dequantize_fp8_blockwise(self.weight, self.weight_scale_inv, self.block, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.chunk_rows is None or self.chunk_rows >= self.out_features:
            return F.linear(x, self.dequantized_weight(x.dtype), bias)
        step = math.ceil(self.chunk_rows / self.block) * self.block  # chunks align with scale rows
        outs = []
        for r0 in range(0, self.out_features, step):
            w = dequantize_fp8_blockwise(
                self.weight[r0 : r0 + step],  # [<=step, in]
                self.weight_scale_inv[r0 // self.block : (r0 + step) // self.block],
                self.block,
                x.dtype,
            )
            outs.append(F.linear(x, w, None if bias is None else bias[r0 : r0 + step]))
        return torch.cat(outs, dim=-1)

    def nbytes(self) -> int:
        """Bytes held by this module: fp8 weight + float32 scales (+ bias)."""
        held = (self.weight, self.weight_scale_inv, self.bias)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def _apply(self, fn, recurse=True):
        return apply_keeping_dtype(self, super()._apply, fn, recurse, ("weight", "weight_scale_inv"))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight=float8_e4m3fn, block={self.block}x{self.block}"
        )


def fp8_linear_nbytes(out_features: int, in_features: int, block: int = BLOCK) -> int:
    """Bytes of an FP8 block-scaled weight: 1 per element plus a float32 scale per block (no bias)."""
    return out_features * in_features + 4 * math.ceil(out_features / block) * math.ceil(in_features / block)


def convert_to_fp8(
    module: nn.Module, skip: tuple[str, ...] = ("lm_head", "gate"), block: int = BLOCK
) -> nn.Module:
    """Replace every nn.Linear under `module` by an FP8Linear, in place; returns `module`.

    `skip` lists attribute names left in full precision. The default follows DeepSeek's FP8 checkpoints,
    which keep lm_head and the MoE router (`mlp.gate`) unquantized (embeddings and norms are not Linear).
    """
    for name, child in list(module.named_children()):
        if name in skip:
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, FP8Linear.from_linear(child, block))
        else:
            convert_to_fp8(child, skip, block)
    return module


# ---------------------------------------------------------------------------------------------------------
# KV-cache quantization (MLA latent cache: c_KV [..., kv_lora_rank] and k_rope [..., qk_rope_head_dim])
# ---------------------------------------------------------------------------------------------------------

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
