"""Shared benchmark helpers: timing with warmup, interleaved repeats, a printed table and a JSON record."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def timeit(fn, warmup: int = 1, repeats: int = 3) -> float:
    """Median seconds of fn() over repeats, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    out = ["  ".join(c.rjust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) >= 1 else f"{v:.4f}"
    return str(v)


def save(name: str, record: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **record}, indent=2) + "\n")
    return path


# ---- model shapes and the hardware yardstick (shared by the training benchmark and benchmarks/gpu_check.sh) ----

# "coarse": the `small` preset with 16 routed experts of 4x the width (the same routed parameters as small's 64),
# top-4, plain greedy routing (no groups): a conventional MoE beside small's fine-grained DeepSeekMoE.
SHAPES = {
    "small": dict(preset="small"),
    "coarse": dict(preset="small", n_routed_experts=16, moe_intermediate_size=256, num_experts_per_tok=4,
                   topk_method="greedy", n_group=1, topk_group=1),
}


def shape_config(name: str, **overrides):
    """ModelConfig of a named shape (SHAPES) or of any preset, with overrides (e.g. num_hidden_layers)."""
    from dsv2 import ModelConfig

    kw = dict(SHAPES.get(name, {"preset": name}))
    return ModelConfig.from_preset(kw.pop("preset"), **{**kw, **overrides})


def matmul_peak_flops(device: str, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """Measured FLOP/s of one large square matmul (best of `repeats` after a warmup): the practical peak this
    machine reaches on dense matmuls with the current thread count. n: 2048 on CPU, 8192 on CUDA by default."""
    n = n or (8192 if device == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call warms up
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best
