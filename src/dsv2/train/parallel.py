"""Data parallelism applied from outside the model: torch.distributed from torchrun's environment, DDP or FSDP2.

    torchrun --nproc-per-node 2 -m dsv2.cli pretrain ...   # gloo on CPU, nccl on CUDA

Without torchrun's variables (WORLD_SIZE unset or 1) everything here is a no-op on one process, so the trainer
has a single code path. Checkpoints are written by rank 0 from a gathered full state dict and keyed by parameter
name, so a checkpoint from any world size or wrapper (none, DDP, FSDP2) resumes under any other.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we called init_process_group, so we tear it down

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size <= 1:
        return Dist(device=device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Dist(rank, world_size, local_rank, device, owns)


def shutdown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, fsdp: bool) -> nn.Module:
    """DDP, or FSDP2 (each decoder layer a unit, then the root), or the model itself on one process."""
    if not d.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(d.device.type, (d.world_size,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model  # fully_shard changes the module in place
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def grad_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch's backward: skip the gradient all-reduce unless `sync` (the last one)."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def on_main(d: Dist, fn):
    """Run fn() on rank 0 only and share whether it worked, so a failure there stops every rank instead of
    leaving the others waiting at the next collective. Returns fn()'s result on rank 0, None elsewhere."""
    result, error = None, None
    if d.is_main:
        try:
            result = fn()
        except BaseException as e:  # re-raised below, after the others have been told
            error = e
    if d.enabled:
        failed = torch.tensor([float(error is not None)], device=d.device)
        dist.broadcast(failed, src=0)
        if failed.item() and not d.is_main:
            raise RuntimeError("stopped: rank 0 failed (its message says why)")
    if error is not None:
        raise error
    return result


def all_gather_object(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def _options(d: Dist):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full_state_dict gathers FSDP shards (a collective: every rank must call); it needs a process group
    return StateDictOptions(full_state_dict=True, cpu_offload=True) if d.enabled else StateDictOptions()


def full_model_state(model: nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """Unsharded parameters by name (on rank 0; other ranks may get an empty dict). Collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(d))


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, d: Dist) -> dict:
    """Optimizer state keyed by parameter name, unsharded (on rank 0). Collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=_options(d))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, d: Dist) -> None:
    """Inverse of full_optimizer_state; every rank passes the full state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True) if d.enabled else StateDictOptions()
    set_optimizer_state_dict(model, opt, state, options=options)


__all__ = ["Dist", "all_gather_object", "all_reduce_sum", "full_model_state", "full_optimizer_state", "grad_sync",
           "init_distributed", "load_optimizer_state", "on_main", "shutdown", "wrap"]
