"""FP8 block-scaled weights: the model's own quantized format, used by dsv2.checkpoint and dsv2.infer.

The layout is that of DeepSeek's published FP8 checkpoints (DeepSeek-V3 and later; config.json
`quantization_config` = FP8_QUANT_CONFIG below): a linear weight W [out, in] is stored as
  `weight`            float8_e4m3fn [out, in]
  `weight_scale_inv`  float32       [ceil(out/128), ceil(in/128)]
and W = weight.float() * weight_scale_inv, each scale covering one 128x128 block (edge blocks may be partial).
Dequantization multiplies in float32 and then casts, as DeepSeek's `weight_dequant` kernel does.

`convert_model_fp8(model)` turns every linear layer except lm_head and the MoE router into an FP8Linear and every
stack of routed experts into FP8RoutedExperts, in place. The weights stay FP8 in memory. `fp8_linear` is the one
product with such a weight: on CPU the kernel of dsv2.model.fp8_cpu reads each FP8 weight once per call and never
writes a dequantized copy (decode at batch 1..8 is bound by reading the weights); on sm90 GPUs FP8 tensor cores
multiply it through torch._scaled_mm with activations quantized per token and 128 channels (DeepSeek's own
inference recipe; `fp8_scaled_mm`); elsewhere (or where neither runs) the weight is dequantized into the compute
dtype, then multiplied. Routed experts are dequantized only when they received tokens. Expert stacks keep the
checkpoint's per-projection blocks: w13 [E, 2I, H] holds gate rows then up rows, and its scales
[E, 2 * ceil(I/128), ceil(H/128)] are the gate's block rows then the up's, so an I that is not a multiple of 128
(tiny presets) still matches the published per-expert tensors exactly.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.model import fp8_cpu
from dsv2.model.moe import ACTIVATIONS, RoutedExperts

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
BLOCK = 128
SCALE = "_scale_inv"  # the scales of tensor X are X_scale_inv, in the model and in the checkpoint
SKIP = ("lm_head", "gate")  # kept in full precision, as in DeepSeek's FP8 checkpoints
# The config.json entry DeepSeek ships with its FP8 checkpoints (activations are quantized on the fly by
# their fp8_gemm kernel; we dequantize weights instead, see FP8Linear).
FP8_QUANT_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [BLOCK, BLOCK],
}


# ---- block quantization --------------------------------------------------------------------------------------
def scale_shape(shape: torch.Size | tuple, block: int = BLOCK) -> tuple[int, ...]:
    """The block scales' shape for a weight [..., rows, cols]."""
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
    scale_inv = wb.abs().amax(dim=(-3, -1)) / FP8_MAX  # [..., R, C]
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
    expected = scale_shape(w_fp8.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(w_fp8.shape)} "
                         f"with block {block}: expected {expected}")
    rows, cols = w_fp8.shape[-2:]
    wb = _to_blocks(fp8_to_float32(w_fp8), block)  # a fresh float32 copy [..., R, b, C, b], safe to scale in place
    wb.mul_(scale_inv.float()[..., :, None, :, None])
    return _from_blocks(wb, rows, cols).to(dtype)


def fp8_linear_nbytes(out_features: int, in_features: int, block: int = BLOCK) -> int:
    """Bytes of an FP8 block-scaled weight: 1 per element plus a float32 scale per block (no bias)."""
    return out_features * in_features + 4 * math.ceil(out_features / block) * math.ceil(in_features / block)


def _cpu_kernel(x: torch.Tensor) -> bool:
    """Whether products with x run through the CPU kernel (inference on CPU, not while torch.compile traces)."""
    return (x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)
            and not torch.compiler.is_compiling() and fp8_cpu.available())


# ---- FP8 matmul on GPUs that have it: torch._scaled_mm with DeepSeek's scales ---------------------------------
# DeepSeek's own inference (fp8_gemm) quantizes activations on the fly per token and 128 channels (act_quant) and
# multiplies them with the 128x128-block weights on FP8 tensor cores. torch._scaled_mm takes exactly that pair
# (1x128 scales for the left operand, 128x128 for the right) through cuBLAS on sm90 with CUDA >= 12.9. Where it is
# refused (another GPU, an older CUDA or PyTorch), the first call says so once and the device falls back to
# dequantize-then-matmul for good. DSV2_FP8_MATMUL=0 switches it off.
_SCALED_MM: dict[tuple[str, int | None], bool] = {}  # device -> True (ran) / False (refused); absent: untried


def quantize_activations(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of block) -> (float8_e4m3fn [M, K], float32 scale_inv [M, K / block]) with
    x ~ q * scale_inv per token and `block` channels: scale_inv = amax / 448 (1 for an all-zero block), as
    DeepSeek's act_quant."""
    M, K = x.shape
    xb = x.float().view(M, K // block, block)
    s = xb.abs().amax(-1) / FP8_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = (xb / s[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(M, K), s


def _scaled_mm_fits(x: torch.Tensor, weight: torch.Tensor, block: int) -> bool:
    """Whether x @ W^T has what torch._scaled_mm with block scales takes: 128-blocks, K a multiple of 128, N of 16,
    bf16/float32 activations, no autograd through x (it has no backward)."""
    return (block == BLOCK and x.dtype in (torch.bfloat16, torch.float32) and weight.shape[1] % BLOCK == 0
            and weight.shape[0] % 16 == 0 and not (torch.is_grad_enabled() and x.requires_grad))


def _scaled_mm_state(x: torch.Tensor, weight: torch.Tensor, block: int) -> bool | None:
    """True: use torch._scaled_mm (it ran here before); None: try it (first call on this device); False: don't."""
    if (x.device.type != "cuda" or not _scaled_mm_fits(x, weight, block)
            or os.environ.get("DSV2_FP8_MATMUL", "1") == "0" or not hasattr(torch, "_scaled_mm")):
        return False
    key = (x.device.type, x.device.index)
    state = _SCALED_MM.get(key)
    if state is None:
        if torch.cuda.get_device_capability(x.device) < (9, 0):
            state = _SCALED_MM[key] = False  # block scales need sm90's FP8 tensor cores
        elif torch.compiler.is_compiling():
            return False  # try it in eager mode first, where a refusal can be caught
    return state


def fp8_scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                  block: int = BLOCK) -> torch.Tensor:
    """x [..., K] @ W^T with W [N, K] FP8 and scale_inv [N / 128, K / 128]: activations quantized per token and 128
    channels, then torch._scaled_mm (FP8 x FP8, float32 accumulation) -> [..., N] in x's dtype. Rows are padded
    to a multiple of 16 (cuBLAS FP8 needs it)."""
    K, N = weight.shape[1], weight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M % 16:
        x2 = F.pad(x2, (0, 0, 0, -M % 16))
    q, s = quantize_activations(x2, block)
    y = torch._scaled_mm(q, weight.t(), scale_a=s.t().contiguous().t(),  # 1x128 scales: outer-dim-major
                         scale_b=scale_inv.t(), out_dtype=x.dtype)
    y = y[:M]
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.view(*x.shape[:-1], N)


def _dequantized_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: int,
                        bias: torch.Tensor | None, chunk_rows: int | None) -> torch.Tensor:
    """F.linear with W dequantized into x's dtype; with chunk_rows, a chunk of rows (rounded up to whole scale
    blocks) at a time, so the transient dense copy is at most chunk_rows x in."""
    bias = None if bias is None else bias.to(x.dtype)
    if chunk_rows is None or chunk_rows >= weight.shape[0]:
        return F.linear(x, dequantize_fp8_blockwise(weight, scale_inv, block, x.dtype), bias)
    step = math.ceil(chunk_rows / block) * block  # chunks align with scale rows
    outs = [F.linear(x, dequantize_fp8_blockwise(weight[r0:r0 + step], scale_inv[r0 // block:(r0 + step) // block],
                                                 block, x.dtype), None if bias is None else bias[r0:r0 + step])
            for r0 in range(0, weight.shape[0], step)]
    return torch.cat(outs, dim=-1)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
               bias: torch.Tensor | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias) -> [..., out] in x's dtype, W [out, in] FP8 with block scales: the CPU kernel where
    it runs (float32 accumulation, then cast), FP8 tensor cores through torch._scaled_mm on GPUs that take block
    scales (activations quantized per token and 128 channels, as DeepSeek's inference does), else dequantize into
    x's dtype and F.linear (`chunk_rows` rows at a time, if given)."""
    if _cpu_kernel(x):
        x2 = x.reshape(-1, x.shape[-1])
        y = fp8_cpu.fp8_linear_into(x2, weight, scale_inv, block,
                                    x2.new_empty(x2.shape[0], weight.shape[0], dtype=torch.float32))
        if bias is not None:
            y += bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
    state = _scaled_mm_state(x, weight, block)
    if state is not False:
        key = (x.device.type, x.device.index)
        try:
            y = fp8_scaled_mm(x, weight, scale_inv, bias, block)
        except RuntimeError as e:
            if state:  # it ran before on this device: a real error, not a refusal
                raise
            _SCALED_MM[key] = False
            warnings.warn(f"dsv2: FP8 matmul with block scales is not available on {x.device} "
                          f"({str(e).splitlines()[0][:200]}); FP8 weights are dequantized per call instead")
        else:
            _SCALED_MM[key] = True
            return y
    return _dequantized_linear(x, weight, scale_inv, block, bias, chunk_rows)


# ---- modules -------------------------------------------------------------------------------------------------
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

    forward() is `fp8_linear`: on CPU the kernel reads the FP8 weight directly, on sm90 GPUs FP8 tensor cores
    multiply it; elsewhere W is dequantized into x's dtype for the call. `chunk_rows` (None = whole weight at once)
    bounds that transient to chunk_rows x in: rows are dequantized and multiplied a chunk at a time (results then
    match the unchunked path to matmul rounding, not bit for bit). `dequantized_weight` (MLA's weight absorption asks for
    kv_b_proj's matrix on every decode step) keeps its last result while the FP8 weight is unchanged.
    """

    QUANTIZED = ("weight", "weight_scale_inv")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block: int = BLOCK,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.bfloat16,
                 chunk_rows: int | None = None):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.chunk_rows = chunk_rows
        self._dense: tuple | None = None  # (key, W) of the last dequantized_weight, see there
        shape = torch.Size((out_features, in_features))
        self.register_buffer("weight", torch.zeros(shape, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale_inv", torch.ones(scale_shape(shape, block), device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_quantized(cls, weight: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                       block: int = BLOCK) -> "FP8Linear":
        """Wrap checkpoint tensors (weight float8_e4m3fn [out, in], scale_inv [ceil(out/b), ceil(in/b)])."""
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise ValueError(f"expected a 2-D {FP8_DTYPE} weight, got {weight.dtype} {tuple(weight.shape)}")
        expected = scale_shape(weight.shape, block)
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
        """W [out, in] in `dtype` (e.g. for MLA weight absorption, which needs kv_b_proj's matrix), kept for the
        next call while weight and scales are the same tensors at the same version (outside torch.compile)."""
        if torch.compiler.is_compiling():
            return dequantize_fp8_blockwise(self.weight, self.weight_scale_inv, self.block, dtype)
        w, s = self.weight, self.weight_scale_inv
        key = (w.data_ptr(), w._version, s.data_ptr(), s._version, w.device, dtype)
        if self._dense is None or self._dense[0] != key:
            self._dense = None  # drop the old copy before making the new one
            self._dense = (key, dequantize_fp8_blockwise(w, s, self.block, dtype))
        return self._dense[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.block, self.bias, self.chunk_rows)

    def nbytes(self) -> int:
        """Bytes held by this module: fp8 weight + float32 scales (+ bias)."""
        held = (self.weight, self.weight_scale_inv, self.bias)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def _apply(self, fn, recurse=True):
        return apply_keeping_dtype(self, super()._apply, fn, recurse, self.QUANTIZED)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight=float8_e4m3fn, block={self.block}x{self.block}")


class FP8RoutedExperts(RoutedExperts):
    """RoutedExperts with FP8 stacks (buffers w13, w13_scale_inv, w2, w2_scale_inv); same forward contract."""

    QUANTIZED = ("w13", "w13_scale_inv", "w2", "w2_scale_inv")

    def __init__(self, n_experts: int, hidden: int, inter: int, block: int = BLOCK,
                 device: torch.device | str | None = None, act: str = "silu"):
        nn.Module.__init__(self)  # no full-precision parameters
        self.inter, self.block, self.impl = inter, block, "auto"
        self.act, self.act_fn = act, ACTIVATIONS[act]
        rb, hb, ib = math.ceil(inter / block), math.ceil(hidden / block), math.ceil(inter / block)
        self.register_buffer("w13", torch.zeros(n_experts, 2 * inter, hidden, dtype=FP8_DTYPE, device=device))
        self.register_buffer("w13_scale_inv", torch.ones(n_experts, 2 * rb, hb, device=device))
        self.register_buffer("w2", torch.zeros(n_experts, hidden, inter, dtype=FP8_DTYPE, device=device))
        self.register_buffer("w2_scale_inv", torch.ones(n_experts, hb, ib, device=device))

    @classmethod
    def from_dense(cls, experts: RoutedExperts, block: int = BLOCK) -> "FP8RoutedExperts":
        E, two_i, H = experts.w13.shape
        I = two_i // 2
        mod = cls(E, H, I, block, device="meta")
        w13 = experts.w13.detach()
        gate, gs = quantize_fp8_blockwise(w13[:, :I], block)
        up, us = quantize_fp8_blockwise(w13[:, I:], block)
        mod.w13, mod.w13_scale_inv = torch.cat([gate, up], dim=1), torch.cat([gs, us], dim=1)
        mod.w2, mod.w2_scale_inv = quantize_fp8_blockwise(experts.w2.detach(), block)
        return mod

    def _apply(self, fn, recurse=True):
        # .to(dtype) must not cast the FP8 stacks or round their scales
        return apply_keeping_dtype(self, super()._apply, fn, recurse, self.QUANTIZED)

    def weights(self, dtype: torch.dtype, active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized stacks (of the `active` experts only, if given: RoutedExperts' grouped path passes the ones
        with rows, 6 of 160 per token in V2) in `dtype`."""
        pick = (lambda t: t) if active is None else (lambda t: t.index_select(0, active))
        return self._dequantize(pick(self.w13), pick(self.w13_scale_inv), pick(self.w2), pick(self.w2_scale_inv),
                                dtype)

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self._dequantize(self.w13[e], self.w13_scale_inv[e], self.w2[e], self.w2_scale_inv[e], dtype)

    def _dequantize(self, w13, s13, w2, s2, dtype):
        I, rb = self.inter, self.w13_scale_inv.shape[1] // 2
        if I % self.block == 0:
            w13 = dequantize_fp8_blockwise(w13, s13, self.block, dtype)
        else:  # gate and up blocks are separate: a partial block row sits between them
            w13 = torch.cat([dequantize_fp8_blockwise(w13[..., :I, :], s13[..., :rb, :], self.block, dtype),
                             dequantize_fp8_blockwise(w13[..., I:, :], s13[..., rb:, :], self.block, dtype)], dim=-2)
        return w13, dequantize_fp8_blockwise(w2, s2, self.block, dtype)

    # The inference loop and the single-token path (RoutedExperts' "loop" and forward_token) on the CPU kernel:
    # each active expert's FP8 stacks are read once for all its rows, never dequantized to memory.
    def _w13_into(self, x: torch.Tensor, e: int, out: torch.Tensor) -> None:
        """out [M, 2I] (float32) = x [M, H] @ w13[e]^T; gate and up separately when their scale rows are separate."""
        I, rb = self.inter, self.w13_scale_inv.shape[1] // 2
        if I % self.block == 0:
            fp8_cpu.fp8_linear_into(x, self.w13[e], self.w13_scale_inv[e], self.block, out)
        else:
            fp8_cpu.fp8_linear_into(x, self.w13[e, :I], self.w13_scale_inv[e, :rb], self.block, out[:, :I])
            fp8_cpu.fp8_linear_into(x, self.w13[e, I:], self.w13_scale_inv[e, rb:], self.block, out[:, I:])

    def forward_token(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        if not _cpu_kernel(x):
            return super().forward_token(x, topk_idx, topk_w)
        experts = topk_idx.tolist()
        h = x.new_empty(len(experts), 2 * self.inter, dtype=torch.float32)  # [K, 2I]
        for k, e in enumerate(experts):
            self._w13_into(x, e, h[k:k + 1])
        a = self._act(h, topk_w.float())  # [K, I], gate-weighted
        out = x.new_empty(len(experts), x.shape[-1], dtype=torch.float32)  # [K, H]
        for k, e in enumerate(experts):
            fp8_cpu.fp8_linear_into(a[k:k + 1], self.w2[e], self.w2_scale_inv[e], self.block, out[k:k + 1])
        return out.sum(0, keepdim=True).to(x.dtype)

    def _loop_into_buffers(self, x: torch.Tensor, n: list[int], row_weight: torch.Tensor | None) -> torch.Tensor:
        if not _cpu_kernel(x):
            return super()._loop_into_buffers(x, n, row_weight)
        h = x.new_empty(x.shape[0], 2 * self.inter, dtype=torch.float32)  # [M, 2I]
        out = x.new_empty(x.shape, dtype=torch.float32)  # [M, H]
        starts = [0]
        for c in n:
            starts.append(starts[-1] + c)
        busy = [e for e, c in enumerate(n) if c]
        for e in busy:
            self._w13_into(x[starts[e]:starts[e + 1]], e, h[starts[e]:starts[e + 1]])
        a = self._act(h, None if row_weight is None else row_weight.float())
        for e in busy:
            fp8_cpu.fp8_linear_into(a[starts[e]:starts[e + 1]], self.w2[e], self.w2_scale_inv[e], self.block,
                                    out[starts[e]:starts[e + 1]])
        return out.to(x.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w13, self.w13_scale_inv, self.w2, self.w2_scale_inv))

    def extra_repr(self) -> str:
        E, two_i, H = self.w13.shape
        return f"experts={E}, hidden={H}, inter={two_i // 2}, weight=float8_e4m3fn, block={self.block}x{self.block}"


# ---- whole models --------------------------------------------------------------------------------------------
def convert_model_fp8(model: nn.Module, block: int = BLOCK) -> nn.Module:
    """Quantize a DeepseekV2 (or any module) to FP8 in place: every nn.Linear except lm_head and the MoE router
    (`mlp.gate`), which DeepSeek's FP8 checkpoints keep unquantized, and every stack of routed experts."""
    for name, child in list(model.named_children()):
        if name in SKIP:
            continue
        if isinstance(child, nn.Linear):
            setattr(model, name, FP8Linear.from_linear(child, block))
        elif isinstance(child, RoutedExperts) and not isinstance(child, FP8RoutedExperts):
            setattr(model, name, FP8RoutedExperts.from_dense(child, block))
        else:
            convert_model_fp8(child, block)
    return model


def fp8_skeleton(model: nn.Module, stored: Iterable[str] | None = None, prefix: str = "") -> None:
    """Swap modules for empty FP8 ones (on the model's device, typically meta) before loading a checkpoint.

    stored: the model's tensor names that the checkpoint holds (dsv2.checkpoint maps them from the checkpoint's
    names); a module becomes FP8 if its scales are among them. None: every module convert_model_fp8 would convert.
    """
    stored = None if stored is None else set(stored)

    def wanted(full: str, cls: type) -> bool:
        return stored is None or any(f"{full}.{b}" in stored for b in cls.QUANTIZED if b.endswith(SCALE))

    for name, child in list(model.named_children()):
        full = f"{prefix}{name}"
        if name in SKIP:
            continue
        if isinstance(child, nn.Linear):
            if wanted(full, FP8Linear):
                dev = child.weight.device
                setattr(model, name, FP8Linear(child.in_features, child.out_features, child.bias is not None, device=dev))
        elif isinstance(child, RoutedExperts) and not isinstance(child, FP8RoutedExperts):
            if wanted(full, FP8RoutedExperts):
                E, two_i, H = child.w13.shape
                setattr(model, name, FP8RoutedExperts(E, H, two_i // 2, device=child.w13.device, act=child.act))
        else:
            fp8_skeleton(child, stored, f"{full}.")


def is_fp8(model: nn.Module) -> bool:
    return any(isinstance(m, (FP8Linear, FP8RoutedExperts)) for m in model.modules())


def weight_nbytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (FP8 weights count 1 byte per element plus their scales)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class FP8Conversion:
    """A checkpoint's tensors as the model wants them, for dsv2.checkpoint.load_checkpoint. `fp8_names`: checkpoint
    names the model holds in FP8.

    names: what can be read (stored names, plus scales produced by quantizing, minus scales consumed by
    dequantizing). read(name): quantize a dense weight wanted in FP8 (`fp8=True` on a bf16/fp32 checkpoint, one
    tensor at a time), dequantize an FP8 weight wanted dense (`fp8=False` on an FP8 checkpoint; to `dtype`,
    bfloat16 by default as in DeepSeek's weight_dequant), pass everything else through.
    """

    def __init__(self, stored: Iterable[str], read: Callable[[str], torch.Tensor], fp8_names: set[str],
                 dtype: torch.dtype | None = None):
        self.stored, self._read, self.fp8_names = set(stored), read, fp8_names
        self.dtype = dtype or torch.bfloat16
        self._pending: dict[str, torch.Tensor] = {}  # quantized halves not yet asked for (scales, or a weight)
        folded = {k for k in self.stored if k.endswith(SCALE) and k[:-len(SCALE)] not in fp8_names}
        self.names = (self.stored | {w + SCALE for w in fp8_names}) - folded

    def _quantized(self, name: str, weight_name: str, half: int) -> torch.Tensor:
        """Each weight is read and quantized once: the half not asked for waits in _pending (the loader may read
        all 2E gate/up weights of an expert stack before their scales; the scales are 1/16384 of the bytes)."""
        if name in self._pending:
            return self._pending.pop(name)
        q = quantize_fp8_blockwise(self._read(weight_name))
        self._pending[(weight_name, weight_name + SCALE)[1 - half]] = q[1 - half]
        return q[half]

    def read(self, name: str) -> torch.Tensor:
        if name.endswith(SCALE) and name not in self.stored:
            return self._quantized(name, name[:-len(SCALE)], 1)
        if name in self.fp8_names and name + SCALE not in self.stored:
            return self._quantized(name, name, 0)
        t = self._read(name)
        if name not in self.fp8_names and t.dtype == FP8_DTYPE and name + SCALE in self.stored:
            return dequantize_fp8_blockwise(t, self._read(name + SCALE), BLOCK, self.dtype)
        return t
