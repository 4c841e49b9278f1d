"""The paper's optimizer recipe: AdamW parameter groups, the learning-rate schedule, the batch-size ramp.

    opt = build_optimizer(model, lr=3e-3)                          # decay 0.1 on matrices, betas (0.9, 0.95)
    lr = lr_at(step, max_lr=3e-3, max_steps=1000, warmup_steps=50)  # warmup, then x0.316 at 60% and 90%
    B = batch_size_at(step, 32, start=8, ramp_steps=200, multiple_of=world_size)

Deviation: the paper places the two LR steps at 60% and 90% of training *tokens* and ramps the batch over the
first 225B tokens; with a fixed step budget we count steps for both (the two agree when there is no ramp).
"""

from __future__ import annotations

import math

import torch
from torch import nn

STEP_DECAY = 0.316
STEP_POINTS = (0.6, 0.9)
SCHEDULES = ("step", "cosine", "constant")  # lr_at's schedules; recipes validate against this


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (Linear and embedding weights, stacked experts, the router) decay; vectors
    (RMSNorm scales, biases) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    cuda = next(model.parameters()).device.type == "cuda"
    # fused AdamW is CUDA-only here; foreach (the default elsewhere) is fine on CPU
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=cuda or None)


def lr_at(step: int, max_lr: float, max_steps: int, warmup_steps: int = 0, schedule: str = "step",
          min_lr_ratio: float = 0.1) -> float:
    """Learning rate for 0-based `step`: linear warmup to max_lr over warmup_steps, then either the paper's step
    decay (x0.316 once past 60% of max_steps and again past 90%), a cosine down to min_lr_ratio * max_lr, or
    "constant" (max_lr to the end: a run to be stopped or continued at will)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if schedule == "step":
        return max_lr * STEP_DECAY ** sum(step >= p * max_steps for p in STEP_POINTS)
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return max_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if schedule == "constant":
        return max_lr
    raise ValueError(f"unknown lr schedule {schedule!r} (use one of {', '.join(SCHEDULES)})")


def batch_size_at(step: int, batch_size: int, start: int = 0, ramp_steps: int = 0, multiple_of: int = 1) -> int:
    """Global batch (sequences) at `step`: linear from `start` to `batch_size` over the first ramp_steps steps
    (start 0 or ramp_steps 0: no ramp), rounded down to a multiple of `multiple_of` (the data-parallel size)."""
    if start <= 0 or ramp_steps <= 0 or step >= ramp_steps:
        b = batch_size
    else:
        b = start + (batch_size - start) * step / ramp_steps
    return max(multiple_of, int(b) // multiple_of * multiple_of)


__all__ = ["batch_size_at", "build_optimizer", "lr_at", "param_groups"]
