"""FP8 weights in the model: block-scaled FP8 experts, whole-model conversion, and the checkpoint-loading bridge.

`convert_model_fp8(model)` turns every linear layer except lm_head and the MoE router into an FP8Linear and every
stack of routed experts into FP8RoutedExperts, in place, as DeepSeek's FP8 checkpoints store them (weight
float8_e4m3fn + float32 `weight_scale_inv` per 128x128 block). Without FP8 matmul hardware the weights stay FP8 in
memory and are dequantized per block when used; experts are dequantized only when they received tokens.

Expert stacks keep the checkpoint's per-projection blocks: w13 [E, 2I, H] holds gate rows then up rows, and its
scales [E, 2 * ceil(I/128), ceil(H/128)] are the gate's block rows then the up's, so an I that is not a multiple
of 128 (tiny presets) still matches the published per-expert tensors exactly.

`FP8Conversion` lets dsv2.checkpoint.load_checkpoint present a checkpoint's tensors the way the model wants them:
quantizing dense weights for FP8 modules (`fp8=True` on a bf16/fp32 checkpoint, one tensor at a time) and
dequantizing FP8 weights for dense ones (`fp8=False` on an FP8 checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from dsv2.infer.quant import (BLOCK, FP8_DTYPE, FP8Linear, apply_keeping_dtype, dequantize_fp8_blockwise,
                               quantize_fp8_blockwise)
from dsv2.model.moe import RoutedExperts

SCALE = "_scale_inv"
SKIP = ("lm_head", "gate")  # kept in full precision, as in DeepSeek's FP8 checkpoints


class FP8RoutedExperts(RoutedExperts):
    """RoutedExperts with FP8 stacks (buffers w13, w13_scale_inv, w2, w2_scale_inv); same forward contract."""

    def __init__(self, n_experts: int, hidden: int, inter: int, block: int = BLOCK,
                 device: torch.device | str | None = None):
        nn.Module.__init__(self)  # no full-precision parameters
        self.inter, self.block, self.use_grouped_mm = inter, block, True
        rb, hb, ib = math.ceil(inter / block), math.ceil(hidden / block), math.ceil(inter / block)
        self.register_buffer("w13", torch.zeros(n_experts, 2 * inter, hidden, dtype=FP8_DTYPE, device=device))
        self.register_buffer("w13_scale_inv", torch.ones(n_experts, 2 * rb, hb, device=device))
        self.register_buffer("w2", torch.zeros(n_experts, hidden, inter, dtype=FP8_DTYPE, device=device))
        self.register_buffer("w2_scale_inv", torch.ones(n_experts, hb, ib, device=device))
        self._active: torch.Tensor | None = None
        self._dtype = torch.bfloat16

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
        return apply_keeping_dtype(self, super()._apply, fn, recurse, ("w13", "w13_scale_inv", "w2", "w2_scale_inv"))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized stacks of the experts in self._active (all experts if None)."""
        idx = self._active
        pick = (lambda t: t) if idx is None else (lambda t: t.index_select(0, idx))
        w13, s13, I, rb = pick(self.w13), pick(self.w13_scale_inv), self.inter, self.w13_scale_inv.shape[1] // 2
        if I % self.block == 0:
            w13 = dequantize_fp8_blockwise(w13, s13, self.block, self._dtype)
        else:  # gate and up blocks are separate: a partial block row sits between them
            w13 = torch.cat([dequantize_fp8_blockwise(w13[:, :I], s13[:, :rb], self.block, self._dtype),
                             dequantize_fp8_blockwise(w13[:, I:], s13[:, rb:], self.block, self._dtype)], dim=1)
        w2 = dequantize_fp8_blockwise(pick(self.w2), pick(self.w2_scale_inv), self.block, self._dtype)
        return w13, w2

    def forward(self, x: torch.Tensor, counts: torch.Tensor, row_weight: torch.Tensor | None = None) -> torch.Tensor:
        # rows arrive grouped by expert: only experts with rows are dequantized (6 of 160 per token in V2)
        active = counts.nonzero().flatten()
        self._active, self._dtype = active, x.dtype
        try:
            return super().forward(x, counts.index_select(0, active), row_weight)
        finally:
            self._active, self._dtype = None, torch.bfloat16

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w13, self.w13_scale_inv, self.w2, self.w2_scale_inv))

    def extra_repr(self) -> str:
        E, two_i, H = self.w13.shape
        return f"experts={E}, hidden={H}, inter={two_i // 2}, weight=float8_e4m3fn, block={self.block}x{self.block}"


def convert_model_fp8(model: nn.Module, block: int = BLOCK) -> nn.Module:
    """Quantize a DeepseekV2 (or any submodule) to FP8 in place: linears except lm_head and the router, and the
    routed expert stacks. Returns the model."""
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
    """Swap modules for empty FP8 ones (on the model's device, typically meta) before loading a checkpoint:
    those whose checkpoint tensors carry `weight_scale_inv` (stored), or every eligible one if stored is None."""
    stored = None if stored is None else set(stored)
    for name, child in list(model.named_children()):
        full = f"{prefix}{name}"
        if name in SKIP:
            continue
        if isinstance(child, nn.Linear):
            if stored is None or f"{full}.weight{SCALE}" in stored:
                dev = child.weight.device
                mod = FP8Linear(child.in_features, child.out_features, child.bias is not None, device=dev)
                setattr(model, name, mod)
        elif isinstance(child, RoutedExperts) and not isinstance(child, FP8RoutedExperts):
            if stored is None or f"{full}.0.gate_proj.weight{SCALE}" in stored:
                E, two_i, H = child.w13.shape
                setattr(model, name, FP8RoutedExperts(E, H, two_i // 2, device=child.w13.device))
        else:
            fp8_skeleton(child, stored, f"{full}.")


def is_fp8(model: nn.Module) -> bool:
    return any(isinstance(m, (FP8Linear, FP8RoutedExperts)) for m in model.modules())


def weight_nbytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (FP8 weights count 1 byte per element plus their scales)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class FP8Conversion:
    """A checkpoint's tensors as the model wants them. `fp8_names`: checkpoint names the model holds in FP8.

    names: what can be read (stored names, plus scales produced by quantizing, minus scales consumed by
    dequantizing). read(name): quantize a dense weight wanted in FP8, dequantize an FP8 weight wanted dense (to
    `dtype`, bfloat16 by default as in DeepSeek's weight_dequant), pass everything else through.
    """

    def __init__(self, stored: Iterable[str], read: Callable[[str], torch.Tensor], fp8_names: set[str],
                 dtype: torch.dtype | None = None):
        self.stored, self._read, self.fp8_names = set(stored), read, fp8_names
        self.dtype = dtype or torch.bfloat16
        self._last: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        names = set(self.stored)
        for w in fp8_names:
            names.add(w + SCALE)  # stored, or computed by quantizing the dense weight
        for k in self.stored:
            if k.endswith(SCALE) and k[: -len(SCALE)] not in fp8_names:
                names.discard(k)  # folded into the dequantized weight
        self.names = names

    def _quantized(self, weight_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._last is None or self._last[0] != weight_name:  # weight and scale are asked for one after the other
            self._last = (weight_name, quantize_fp8_blockwise(self._read(weight_name)))
        return self._last[1]

    def read(self, name: str) -> torch.Tensor:
        if name.endswith(SCALE) and name not in self.stored:
            return self._quantized(name[: -len(SCALE)])[1]
        if name in self.fp8_names and name + SCALE not in self.stored:
            return self._quantized(name)[0]
        t = self._read(name)
        if name not in self.fp8_names and t.dtype == FP8_DTYPE and name + SCALE in self.stored:
            return dequantize_fp8_blockwise(t, self._read(name + SCALE), BLOCK, self.dtype)
        return t
