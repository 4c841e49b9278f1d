"""Expert parallelism applied from outside the model: routed experts split over the ranks of an EP process group.

    torchrun --nproc-per-node 2 -m dsv2.cli pretrain --ep 2 ...          # experts split in two, no data parallel
    torchrun --nproc-per-node 4 -m dsv2.cli pretrain --ep 2 --fsdp ...   # mesh (dp 2, ep 2); FSDP2 over the rest

    ep = apply_expert_parallel(model, group)    # in place: each rank keeps experts [r*E/D, (r+1)*E/D)
    logits = model(ids)                         # every rank of the group runs the forward (collectives inside)

The MoE's seam (model/moe.py) routes, then calls `dispatcher.dispatch` -> experts -> `dispatcher.combine`.
`EPDispatcher` sends each token's hidden state with `all_to_all_single` (variable split sizes) once to every rank
holding any of its experts, runs the local experts there, and sends one summed output per (token, rank) back; both
directions are differentiable (the backward of an all-to-all is the all-to-all with the split sizes swapped).

Device-limited routing: the devices are the EP ranks, and the gate's groups map onto them (n_group a multiple of
the EP size, each rank holding whole groups), so group-limited routing (topk_group groups per token) sends every
token to at most M = topk_group devices. The device- and communication-level balance losses use the EP ranks as
the devices (what is sent: a token goes to device d iff one of its experts lives there), and token dropping runs
at each rank's capacity: every sender ships the affinities of its pairs to their device (a small all-to-all), the
device keeps the ceil(capacity_factor * pairs in the group / D) best (pairs of exempt sequences always), and tells
the senders which survived, so dropped pairs are never sent at all.

Gradients: a rank's non-expert gradients come from its own tokens (averaged over all ranks, as data parallel); an
expert's gradient collects every EP-group rank's tokens, so it is summed over the data-parallel replicas of that
shard and divided by the world size (`sync_grads`). `clip_grad_norm` counts every expert shard once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.moe import RoutedExperts


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable split sizes; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows x[in_splits[j] block] go to rank j; returns the rows received, grouped by source rank (autograd)."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _exchange(t: torch.Tensor, group) -> torch.Tensor:
    """all_to_all_single of equal blocks (no autograd): block j of t goes to rank j."""
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t.contiguous(), group=group)
    return out


def device_limit(cfg: ModelConfig, n_devices: int) -> int:
    """M: the most devices one token's experts can be spread over (the communication loss's normaliser)."""
    if cfg.topk_method == "group_limited_greedy":
        return min(cfg.topk_group, n_devices)
    return min(cfg.num_experts_per_tok, n_devices)


class EPDispatcher:
    """The MoE seam over an EP group of D ranks; rank r holds experts [r*L, (r+1)*L), L = n_experts / D.

    A token goes once to each device holding any of its experts (a "unit"), with the list of its experts there
    and their gate weights; the device runs its experts on the rows of each unit, sums them per unit and sends one
    row back per unit. So the traffic per token is the number of devices it reaches (at most M under
    device-limited routing), not K. dispatch returns this rank's rows grouped by local expert (counts [L], gate
    weights per row); combine returns every token's sum. `n_devices`, `token_drop` and `routed_load` are the
    MoE's optional dispatcher hooks: the devices of the balance losses, device-level dropping (collective), and
    this rank's pairs per expert [E] (the run's expert-load statistics); `sent` counts the last dispatch's units
    per destination rank.
    """

    def __init__(self, group, n_experts: int):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.n_devices = self.size
        self.per_rank = n_experts // self.size
        self.routed_load: torch.Tensor | None = None
        self.sent: torch.Tensor | None = None

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor, n_experts: int,
                 keep: torch.Tensor | None = None):
        """x [N, H], topk_idx/topk_w [N, K], keep [N, K] -> (rows [R, H] for this rank's experts, grouped by
        expert, counts [L], row gate weights [R], state). Each token goes once to each device holding any of its
        (kept) experts, whatever the number of its experts there: device-limited routing bounds the traffic."""
        N, K = topk_idx.shape
        D, L = self.size, self.per_rank
        pair = torch.arange(N * K, device=x.device) if keep is None else keep.flatten().nonzero().flatten()
        expert = topk_idx.flatten()[pair]
        token, dev = pair // K, expert // L
        order = torch.argsort((dev * N + token) * L + expert % L)  # by device, then token, then expert
        pair, expert, token, dev = pair[order], expert[order], token[order], dev[order]
        first = torch.ones_like(dev, dtype=torch.bool)  # a pair opening a new (device, token) unit
        first[1:] = (dev[1:] != dev[:-1]) | (token[1:] != token[:-1])
        unit = first.cumsum(0) - 1  # [P] the unit (hidden state sent) of each pair
        unit_token, units_to = token[first], torch.bincount(dev[first], minlength=D)
        pairs_to = torch.bincount(dev, minlength=D)
        local_unit = unit - (units_to.cumsum(0) - units_to)[dev]  # index within its device's block
        got = _exchange(torch.stack([units_to, pairs_to], 1), self.group)  # [D sources, (units, pairs)]
        su, sp, ru, rp = units_to.tolist(), pairs_to.tolist(), got[:, 0].tolist(), got[:, 1].tolist()
        units = all_to_all(x.index_select(0, unit_token), ru, su, self.group)  # [U, H] by source
        meta = torch.empty(sum(rp), 2, dtype=torch.long, device=x.device)  # (unit in its source block, expert)
        dist.all_to_all_single(meta, torch.stack([local_unit, expert % L], 1), rp, sp, group=self.group)
        weight = all_to_all(topk_w.flatten()[pair], rp, sp, self.group)  # [P'] gate weights (autograd)
        source = torch.repeat_interleave(torch.arange(D, device=x.device), got[:, 1], output_size=len(meta))
        row_unit = (got[:, 0].cumsum(0) - got[:, 0])[source] + meta[:, 0]  # [P'] unit index in `units`
        by_expert = torch.argsort(meta[:, 1], stable=True)
        row_unit = row_unit[by_expert]
        self.routed_load = torch.bincount(expert, minlength=n_experts)  # this rank's kept pairs per expert [E]
        self.sent = units_to  # [D] tokens (hidden states) sent to each rank in this dispatch, itself included
        state = (unit_token, row_unit, su, ru, x.shape, units.shape[0])
        return (units.index_select(0, row_unit), torch.bincount(meta[:, 1], minlength=L),
                weight.index_select(0, by_expert), state)

    def combine(self, out: torch.Tensor, state) -> torch.Tensor:
        """Local experts' gate-weighted outputs [R, H] -> y [N, H]: summed per unit here, each unit sent back
        once, then summed per token."""
        unit_token, row_unit, su, ru, shape, n_units = state
        per_unit = out.new_zeros(n_units, out.shape[1]).index_add_(0, row_unit, out)
        back = all_to_all(per_unit, su, ru, self.group)  # [U sent, H]
        return back.new_zeros(shape).index_add_(0, unit_token, back)

    def token_drop(self, affinity: torch.Tensor, topk_idx: torch.Tensor, batch_size: int, cfg: ModelConfig,
                   exempt_seq: torch.Tensor | None = None) -> torch.Tensor:
        """Device-level dropping at each EP rank's capacity. affinity/topk_idx [N, K] -> keep [N, K] bool.

        Device d takes at most ceil(capacity_factor * (pairs of the whole EP group) / D) pairs, its best by
        affinity (ties: source rank, then pair order, as the single-process drop over the ranks' tokens in rank
        order); pairs of exempt sequences are always kept. Collective over the EP group."""
        N, K = topk_idx.shape
        D = self.size
        dev = (topk_idx // self.per_rank).flatten()  # [N*K] destination rank of each pair
        if exempt_seq is None:
            exempt_seq = torch.rand(batch_size, device=affinity.device) < cfg.drop_exempt_fraction
        exempt = exempt_seq.repeat_interleave(N // batch_size)[:, None].expand(N, K).flatten()
        priority = affinity.detach().flatten().float() + 2.0 * exempt  # exempt pairs rank first (affinity <= 1)
        order = torch.argsort(dev, stable=True)
        send = torch.bincount(dev, minlength=D)
        meta = _exchange(torch.stack([send, send.new_full((D,), N * K)], 1), self.group)  # [D, 2]: to me, total
        send_splits, recv_splits = send.tolist(), meta[:, 0].tolist()
        incoming = torch.empty(sum(recv_splits), device=priority.device)
        dist.all_to_all_single(incoming, priority[order].contiguous(), recv_splits, send_splits, group=self.group)
        capacity = math.ceil(cfg.capacity_factor * int(meta[:, 1].sum()) / D)
        best = torch.argsort(-incoming, stable=True)[:capacity]
        kept_here = (incoming >= 2.0).float().index_fill_(0, best, 1.0)
        kept = torch.empty(N * K, device=priority.device)
        dist.all_to_all_single(kept, kept_here, send_splits, recv_splits, group=self.group)
        keep = torch.empty(N * K, dtype=torch.bool, device=priority.device)
        keep[order] = kept > 0.5
        return keep.view(N, K)


@dataclass
class ExpertParallel:
    """What apply_expert_parallel did to a model (kept as `model.expert_parallel`)."""
    group: object  # the EP process group
    rank: int  # this process's index in it
    size: int  # D, the number of EP ranks (devices)
    per_rank: int  # routed experts per rank
    dp_group: object = None  # the ranks holding the same expert shard (data parallel over them), None: just one

    def local_experts(self) -> range:
        return range(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)


def check_config(cfg: ModelConfig, ep: int) -> None:
    """Raise ValueError unless the model's experts (and groups) split evenly over ep ranks."""
    if cfg.n_routed_experts == 0 or cfg.n_routed_experts % ep:
        raise ValueError(f"--ep {ep}: the model's {cfg.n_routed_experts} routed experts do not split evenly over "
                         f"{ep} ranks")
    if cfg.topk_method == "group_limited_greedy" and cfg.n_expert_groups % ep:
        raise ValueError(f"--ep {ep}: group-limited routing over {cfg.n_expert_groups} expert groups needs n_group "
                         f"to be a multiple of the EP size (each rank holds whole groups); set [model] n_group")


def expert_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The routed experts' stacks by name (sharded under expert parallel)."""
    return {n: p for n, p in model.named_parameters() if ".mlp.experts." in n}


def apply_expert_parallel(model: nn.Module, group, dp_group=None) -> ExpertParallel:
    """Split `model`'s routed experts over the ranks of `group` and install EPDispatcher in every MoE layer.

    In place; a model on the meta device stays there (each rank then materialises only its shard: `materialize`
    or checkpoint.load_checkpoint(prepare=...)). A full model is sliced (each rank keeps its experts)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    check_config(model.config, size)
    per_rank = model.config.n_routed_experts // size
    lo = rank * per_rank
    for moe in model.moe_layers():
        experts = moe.experts
        if not isinstance(experts.w13, nn.Parameter):
            raise ValueError("expert parallel needs full-precision experts (FP8 stacks are not split)")
        for name in ("w13", "w2"):
            p = getattr(experts, name)
            shard = (torch.empty((per_rank, *p.shape[1:]), dtype=p.dtype, device=p.device) if p.is_meta
                     else p.detach()[lo:lo + per_rank].clone())
            setattr(experts, name, nn.Parameter(shard, requires_grad=p.requires_grad))
        experts.first_expert = lo  # the checkpoint table's offset (dsv2.checkpoint.hf_tensors / load_checkpoint)
        experts._views = None
        moe.dispatcher = EPDispatcher(group, model.config.n_routed_experts)
    model.expert_parallel = ExpertParallel(group, rank, size, per_rank, dp_group)
    return model.expert_parallel


def materialize(model: nn.Module, device: torch.device) -> None:
    """A meta-device model (experts split) onto `device`, initialised as DeepseekV2(cfg) would be."""
    model.to_empty(device=device)
    init_weights(model)


@torch.no_grad()
def init_weights(model: nn.Module, std: float | None = None) -> None:
    """model.init_weights(std) for a model with split experts, giving exactly the weights init_weights gives the
    whole model after the same torch.manual_seed (so every rank holds the same non-expert weights): it runs over
    the same modules in the same order, each routed expert stack drawn whole (one layer's stack at a time, for
    the random stream) and sliced to this shard. (DeepseekV2(cfg) on a real device first draws each layer's
    default init too, so a from-scratch single-process run starts from other numbers; --init-from starts both
    from the same weights.)"""
    ep: ExpertParallel = model.expert_parallel
    local = ep.local_experts()
    device = model.lm_head.weight.device

    def modules():
        for m in model.modules():
            if not isinstance(m, RoutedExperts):
                yield m
                continue
            with torch.device(device):
                full = RoutedExperts(ep.size * ep.per_rank, m.w13.shape[2], m.inter, m.act)
            yield full
            m.w13.copy_(full.w13[local.start:local.stop])
            m.w2.copy_(full.w2[local.start:local.stop])
            del full

    class _Walk:  # init_weights' view of the model: the same modules, full-size expert stacks
        config = model.config

    walk = _Walk()
    walk.modules = modules
    type(model).init_weights(walk, std)


def sync_grads(model: nn.Module, world_group=None, average_rest: bool = True) -> None:
    """After the step's backward: non-expert gradients averaged over all ranks (unless FSDP did it:
    average_rest False), expert gradients summed over their data-parallel replicas and divided by the world size
    (each already holds every EP-group rank's tokens). One all-reduce per group, flattened."""
    ep: ExpertParallel = model.expert_parallel
    world = dist.get_world_size(world_group)
    experts = expert_params(model)
    rest = [p.grad for n, p in model.named_parameters() if n not in experts and p.grad is not None]
    mine = [p.grad for p in experts.values() if p.grad is not None]
    if average_rest:
        _all_reduce_flat(rest, world_group, 1.0 / world)
    _all_reduce_flat(mine, ep.dp_group, 1.0 / world, reduce=ep.dp_group is not None)


def _all_reduce_flat(grads: list[torch.Tensor], group, scale: float, reduce: bool = True) -> None:
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if reduce:
        dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def clip_grad_norm(model: nn.Module, max_norm: float, world_group=None) -> torch.Tensor:
    """The global gradient norm (expert shards counted once each, FSDP shards summed) and clipping to max_norm;
    the same value on every rank. Returns the norm before clipping (float32)."""
    ep: ExpertParallel = model.expert_parallel
    experts = expert_params(model)
    dev = model.lm_head.weight.device
    sq = torch.zeros(2, dtype=torch.float64, device=dev)  # squared norms: [rest, experts]
    sharded = False
    grads = []
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad
        if hasattr(g, "to_local"):  # an FSDP2 DTensor: this rank's shard of it
            g, sharded = g.to_local(), True
        sq[int(n in experts)] += g.detach().double().pow(2).sum()
        grads.append(g)
    dist.all_reduce(sq[1:], group=ep.group)  # every expert shard once (the dp replicas hold the same)
    if sharded:
        dist.all_reduce(sq[:1], group=world_group)
    total = sq.sum().sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total.float()


__all__ = ["EPDispatcher", "ExpertParallel", "all_to_all", "apply_expert_parallel", "check_config", "clip_grad_norm",
           "device_limit", "expert_params", "init_weights", "materialize", "sync_grads"]
