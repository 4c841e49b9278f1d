"""Parallelism applied from outside the model: torch.distributed from torchrun's environment, DDP or FSDP2, and
expert parallel (train/expert_parallel.py) over one dimension of a (dp, ep) DeviceMesh.

    torchrun --nproc-per-node 2 -m dsv2.cli pretrain ...                  # gloo on CPU, nccl on CUDA
    torchrun --nproc-per-node 4 -m dsv2.cli pretrain --ep 2 [--fsdp] ...  # experts split in 2, data parallel x2

Without torchrun's variables (WORLD_SIZE unset or 1) everything here is a no-op on one process, so the trainer
has a single code path. Checkpoints are keyed by parameter name in the HF layout, so a checkpoint from any world
size or wrapper (none, DDP, FSDP2, EP) resumes under any other: without EP rank 0 writes a gathered full state
dict; under EP each rank of the first data-parallel row writes its own experts' file (rank 0 also the rest).

Under EP the model is built on the meta device and each rank materialises (or reads from the checkpoint) only
its own experts. DDP is not used: after the step's last backward `grad_sync` averages the non-expert gradients
over all ranks (FSDP2 reduce-scatters them when --fsdp) and sums each expert shard's over its data-parallel
replicas, divided by the world size.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dsv2.checkpoint import load_checkpoint
from dsv2.config import ModelConfig
from dsv2.model import DeepseekV2
from dsv2.train.expert_parallel import expert_params


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we called init_process_group, so we tear it down
    ep: int = 1  # expert-parallel size: the routed experts are split over this many ranks
    mesh: object = None  # the (dp, ep) DeviceMesh under expert parallel
    ep_group: object = None  # this rank's EP group (consecutive ranks)
    dp_group: object = None  # the ranks holding the same experts as this one (None: no data parallel over them)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(ep: int = 1) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); pick this process's device.
    ep > 1: a (dp, ep) mesh, the EP groups being consecutive ranks (one node's GPUs on a cluster)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if ep < 1 or world_size % ep or (ep > 1 and world_size < 2):
        raise ValueError(f"--ep {ep} needs a number of processes that is a multiple of it (torchrun "
                         f"--nproc-per-node N); this run has {world_size}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size <= 1:
        return Dist(device=device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    d = Dist(rank, world_size, local_rank, device, owns)
    if ep > 1:
        from torch.distributed.device_mesh import init_device_mesh

        d.ep, d.mesh = ep, init_device_mesh(device.type, (world_size // ep, ep), mesh_dim_names=("dp", "ep"))
        d.ep_group = d.mesh.get_group("ep")
        d.dp_group = d.mesh.get_group("dp") if world_size > ep else None
    return d


def shutdown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def build_model(cfg: ModelConfig, d: Dist, source: Path | None = None, init_std: float | None = None) -> nn.Module:
    """The model to train, in float32 on this rank's device: `source`'s weights, or initialised (after the
    caller's torch.manual_seed: the same weights for any layout). Under EP it is built on the meta device and only
    this rank's experts are materialised or read."""
    if d.ep > 1:
        from dsv2.train import expert_parallel as xp

        def prepare(model):
            xp.apply_expert_parallel(model, d.ep_group, d.dp_group)

        if source is not None:
            return load_checkpoint(source, dtype=torch.float32, device=d.device, config=cfg, fp8=False,
                                   prepare=prepare).train()
        with torch.device("meta"):
            model = DeepseekV2(cfg)
        prepare(model)
        xp.materialize(model, d.device)
        if init_std is not None:  # the single-process path draws the default init first, then this one
            xp.init_weights(model, init_std)
        return model.train()
    if source is not None:
        model = load_checkpoint(source, dtype=torch.float32, config=cfg, fp8=False)
    else:
        model = DeepseekV2(cfg)
        if init_std is not None:
            model.init_weights(init_std)
    return model.to(d.device).train()


def wrap(model: nn.Module, d: Dist, fsdp: bool) -> nn.Module:
    """DDP, or FSDP2 (each decoder layer a unit, then the root), or the model itself on one process. Under EP:
    no DDP (grad_sync reduces), and FSDP2 leaves the expert shards out (they are split by EP already)."""
    if not d.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(d.device.type, (d.world_size,))
        ignored = set(expert_params(model).values()) if d.ep > 1 else None
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, ignored_params=ignored)
        fully_shard(model, mesh=mesh, ignored_params=ignored)
        return model  # fully_shard changes the module in place
    if d.ep > 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def grad_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch's backward: skip the gradient all-reduce unless `sync` (the last one)."""
    if getattr(model, "expert_parallel", None) is not None:
        return _ep_grad_sync(model, sync)
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _ep_grad_sync(model: nn.Module, sync: bool):
    from dsv2.train.expert_parallel import sync_grads

    fsdp = hasattr(model, "set_requires_gradient_sync")
    if fsdp:
        model.set_requires_gradient_sync(sync)
    yield
    if sync:
        sync_grads(model, average_rest=not fsdp)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients to a global norm of max_norm; returns the norm before clipping (the same on every
    rank, a plain tensor). Under EP every expert shard counts once (expert_parallel.clip_grad_norm)."""
    if getattr(model, "expert_parallel", None) is not None:
        from dsv2.train.expert_parallel import clip_grad_norm as ep_clip

        return ep_clip(model, max_norm)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


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
    """Optimizer state keyed by parameter name, unsharded (on rank 0). Collective under FSDP and EP (each expert
    state gathered from the EP group onto its first rank, one tensor at a time)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, opt, options=_options(d))
    if d.ep > 1:
        for name, p in expert_params(model).items():
            for key, value in sorted(opt.state.get(p, {}).items()):
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    first = dist.get_rank(d.ep_group) == 0  # every EP group gathers; rank 0 keeps its own
                    parts = [torch.empty_like(value) for _ in range(d.ep)] if first else None
                    dist.gather(value.contiguous(), parts, group=d.ep_group, group_dst=0)
                    if d.is_main:
                        full["state"][name][key] = torch.cat(parts).cpu()
    return full


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, d: Dist) -> None:
    """Inverse of full_optimizer_state; every rank passes the full state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if d.ep > 1:  # this rank's experts of the full expert states
        mine = model.expert_parallel.local_experts()
        entries = dict(state["state"])
        for name in expert_params(model):
            if name in entries:
                entries[name] = {k: v[mine.start:mine.stop] if isinstance(v, torch.Tensor) and v.dim() else v
                                 for k, v in entries[name].items()}
        state = {**state, "state": entries}
    options = StateDictOptions(full_state_dict=True) if d.enabled else StateDictOptions()
    set_optimizer_state_dict(model, opt, state, options=options)


def write_model_shards(model: nn.Module, path: Path, d: Dist):
    """Under EP, the first part of a checkpoint save (collective): each rank of the first data-parallel row
    writes its own experts (rank 0 also every other tensor, gathered from FSDP shards one at a time) into a
    temporary directory beside `path`. Returns, on rank 0, `finish(extra)` that completes the checkpoint (index,
    config, extra files, atomic swap; OSError if any rank's write failed); None elsewhere and without EP."""
    if d.ep <= 1:
        return None
    from dsv2.checkpoint import finish_checkpoint, hf_tensors, new_temp_dir, write_weights

    ep = model.expert_parallel
    tag = all_gather_object(os.getpid(), d)[0]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    if d.is_main:
        new_temp_dir(path, tag)
    dist.barrier()
    writer = d.rank < ep.size  # the first data-parallel row: EP ranks 0 .. D-1
    items = []
    for name, t in hf_tensors(model):
        if hasattr(t, "full_tensor"):  # an FSDP2 shard: gathered (every rank takes part), kept by rank 0
            t = t.full_tensor()
        if writer and (ep.rank == 0 or ".mlp.experts." in name):
            items.append((name, t))
    result = None
    if writer:
        fname = f"model-{ep.rank + 1:05d}-of-{ep.size:05d}.safetensors"
        try:
            result = {fname: write_weights(items, tmp / fname)}
        except OSError as e:
            result = f"{fname}: {e.strerror or e}"
    del items
    results = all_gather_object(result, d)
    if not d.is_main:
        return None

    def finish(extra=None):
        try:
            errors = [r for r in results if isinstance(r, str)]
            if errors:
                raise OSError(f"could not write {'; '.join(errors)}")
            sizes = {f: s for r in results if isinstance(r, dict) for f, s in r.items()}
            finish_checkpoint(tmp, path, model.config, sizes, model.lm_head.weight.dtype, extra)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return finish


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_local(fn, world: int, *args) -> None:
    """fn(rank, world, *args) on `world` local CPU processes joined in one gloo group (torch.multiprocessing
    spawn; fn must be importable by name): the tests and benchmarks of the multi-process code, without torchrun."""
    import torch.multiprocessing as mp

    mp.spawn(_local_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)


__all__ = ["Dist", "all_gather_object", "all_reduce_sum", "build_model", "clip_grad_norm", "expert_params",
           "full_model_state", "full_optimizer_state", "grad_sync", "init_distributed", "load_optimizer_state",
           "on_main", "run_local", "shutdown", "wrap", "write_model_shards"]
