"""A checkpoint's trainer state without pickle: tensors in safetensors, everything else in JSON.

    trainer_state.json         step, tokens, recipe, data position, last metrics, the optimizer's param_groups
                               (hyperparameters and parameter names) and any non-tensor optimizer values
    trainer_state.safetensors  "optimizer/<param name>/<key>" (AdamW's exp_avg, exp_avg_sq, step),
                               "rng/cpu/<rank>", "rng/cuda/<rank>" (uint8 generator states), and the run's other
                               tensors under their own names (e.g. "expert_load")

The optimizer state is the full (unsharded) one keyed by parameter name (parallel.full_optimizer_state), so a
checkpoint from any world size or wrapper resumes under any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_trainer_state(path: Path, state: dict, optimizer: dict, rng: list[tuple[torch.Tensor, torch.Tensor | None]],
                        tensors: dict[str, torch.Tensor]) -> None:
    """Write both files into checkpoint dir `path`. `optimizer`: {"state": {name: {key: value}}, "param_groups"};
    `rng`: (cpu, cuda or None) generator states, one pair per rank."""
    flat = {k: t.detach().cpu().contiguous().clone() for k, t in tensors.items()}
    scalars: dict[str, dict] = {}
    for name, entry in optimizer["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                flat[f"optimizer/{name}/{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(name, {})[key] = value
    for rank, (cpu, cuda) in enumerate(rng):
        flat[f"rng/cpu/{rank}"] = cpu.clone()
        if cuda is not None:
            flat[f"rng/cuda/{rank}"] = cuda.clone()
    save_file(flat, path / STATE_TENSORS, metadata={"format": "pt"})
    state = {**state, "optimizer": {"param_groups": optimizer["param_groups"], "scalars": scalars}}
    (path / STATE_JSON).write_text(json.dumps(state, indent=2, default=_json_default) + "\n")


def read_trainer_state(ckpt: str | Path) -> dict:
    """trainer_state.json as a dict."""
    file = Path(ckpt) / STATE_JSON
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:  # truncated or not JSON (FileNotFoundError passes: the caller's message names it)
        raise ValueError(f"{file}: damaged trainer state ({e}); resume from an earlier checkpoint") from None


def read_trainer_tensors(ckpt: str | Path) -> tuple[dict, list[torch.Tensor], list[torch.Tensor], dict]:
    """(optimizer state dict keyed by parameter name, CPU RNG states by rank, CUDA ones (maybe empty), the other
    tensors by name), the inverse of write_trainer_state."""
    ckpt = Path(ckpt)
    meta = read_trainer_state(ckpt)["optimizer"]
    try:
        flat = load_file(ckpt / STATE_TENSORS)
    except Exception as e:  # safetensors raises its own error type for a truncated or damaged file
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{ckpt / STATE_TENSORS}: damaged trainer state ({e}); resume from an earlier "
                         "checkpoint") from None
    state: dict[str, dict] = {name: dict(values) for name, values in meta["scalars"].items()}
    rng: dict[str, dict[int, torch.Tensor]] = {"cpu": {}, "cuda": {}}
    other = {}
    for key, t in flat.items():
        if key.startswith("optimizer/"):
            name, sub = key[len("optimizer/"):].rsplit("/", 1)
            state.setdefault(name, {})[sub] = t
        elif key.startswith("rng/"):
            _, kind, rank = key.split("/")
            rng[kind][int(rank)] = t
        else:
            other[key] = t
    # JSON turned tuples (AdamW's betas) into lists
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    by_rank = [[r[i] for i in sorted(r)] for r in (rng["cpu"], rng["cuda"])]
    return {"state": state, "param_groups": groups}, by_rank[0], by_rank[1], other


__all__ = ["STATE_JSON", "STATE_TENSORS", "read_trainer_state", "read_trainer_tensors", "write_trainer_state"]
