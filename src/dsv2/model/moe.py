"""DeepSeekMoE: shared experts + fine-grained routed experts, group-limited routing, balance losses, token dropping.

FFN(u) = u + shared(u) + sum_i g_i * expert_i(u) (the residual add lives in the block). Routed experts are stored
stacked (`w13 [E, 2I, H]` = gate rows then up rows, `w2 [E, H, I]`) so tokens sorted by expert run through one
grouped matmul per projection (`torch._grouped_mm`) instead of a Python loop; a loop over the experts that got
tokens is the fallback where grouped_mm does not run (CUDA below sm90 or non-bf16 on CUDA). The checkpoint table
(dsv2.checkpoint) maps the stacks to and from the published per-expert names.

Deviation of transformers (4.57, our test oracle, and still 5.24): its gate ignores `norm_topk_prob` and always
multiplies by `routed_scaling_factor`. We follow DeepSeek's reference: normalise the top-k weights when norm_topk_prob (and k > 1),
otherwise scale them (tests/test_moe.py checks both against the formula).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU MLP; used for dense layers and for the shared experts (as one MLP of n_shared * moe_intermediate)."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.method = cfg.topk_method
        self.n_group, self.topk_group = cfg.n_expert_groups, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor):
        """x [N, H] -> scores [N, E] (float32 softmax), topk_idx [N, K], topk_weight [N, K] (float32)."""
        scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1)
        if self.method == "group_limited_greedy":
            n = scores.shape[0]
            grouped = scores.view(n, self.n_group, -1)  # [N, G, E/G]
            group_idx = grouped.amax(dim=-1).topk(self.topk_group, dim=-1, sorted=False).indices  # best expert/group
            keep = torch.zeros(n, self.n_group, 1, dtype=torch.bool, device=scores.device)
            keep.scatter_(1, group_idx[:, :, None], True)  # broadcast over the group's experts, no per-expert mask
            topk_w, topk_idx = grouped.masked_fill(~keep, 0.0).view(n, -1).topk(self.top_k, dim=-1, sorted=False)
        else:
            topk_w, topk_idx = scores.topk(self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob and self.top_k > 1:
            topk_w = topk_w / (topk_w.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            topk_w = topk_w * self.routed_scaling_factor
        return scores, topk_idx, topk_w


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored stacked. forward(x_sorted [M, H], counts [E]) with rows grouped by expert."""

    def __init__(self, n_experts: int, hidden: int, inter: int):
        super().__init__()
        self.inter = inter
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * inter, hidden))  # [E, 2I, H]: gate_proj ; up_proj
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, inter))  # [E, H, I]: down_proj
        self.use_grouped_mm = True  # switch for the loop reference path (tests compare the two)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w13, self.w2

    def forward(self, x: torch.Tensor, counts: torch.Tensor, row_weight: torch.Tensor | None = None) -> torch.Tensor:
        """row_weight [M]: the gate weight of each row, applied before the down projection (it is linear, and the
        activation is half the width of the output)."""
        w13, w2 = self.weights()
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # grouped_mm is not autocast-aware: cast as F.linear would
            x = x.to(torch.get_autocast_dtype(dev))
        w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
        if self.use_grouped_mm and _grouped_mm_ok(x):
            offs = counts.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)  # [M, 2I]
            g, u = h.split(self.inter, dim=-1)
            a = F.silu(g) * u if row_weight is None else F.silu(g) * u * row_weight[:, None].to(x.dtype)
            return torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)  # [M, H]
        outs, start = [], 0
        for e, c in enumerate(counts.tolist()):
            if c == 0:
                continue
            g, u = F.linear(x[start:start + c], w13[e]).split(self.inter, dim=-1)
            a = F.silu(g) * u
            if row_weight is not None:
                a = a * row_weight[start:start + c, None].to(x.dtype)
            outs.append(F.linear(a, w2[e]))
            start += c
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])


def balance_losses(scores: torch.Tensor, topk_idx: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The paper's three auxiliary losses. scores [B, T, E] float32, topk_idx [B, T, K]. Returns weighted losses.

    Devices are the expert groups (n_group); with one group the device and communication losses are zero.
    """
    B, T, E = scores.shape
    K = topk_idx.shape[-1]
    N = B * T
    one_hot = torch.zeros(B, T, E, device=scores.device).scatter_(2, topk_idx, 1.0)  # [B, T, E], no grad
    counts_seq = one_hot.sum(1)  # [B, E]
    P = scores.reshape(N, E).mean(0)  # [E]
    f = counts_seq.sum(0) * (E / (K * N))
    expert_batch = (f * P).sum()
    expert_seq = (counts_seq * (E / (K * T)) * scores.mean(1)).sum(1).mean()
    out = {"expert": cfg.aux_loss_alpha * (expert_seq if cfg.seq_aux else expert_batch),
           "expert_batch": cfg.aux_loss_alpha * expert_batch, "expert_seq": cfg.aux_loss_alpha * expert_seq}
    D = cfg.n_expert_groups
    if D > 1:
        P_dev = P.view(D, -1).sum(1)
        f_dev = f.view(D, -1).mean(1)
        # M: devices a token may reach (the device limit), so a uniform spread gives f'' = 1
        M = cfg.topk_group if cfg.topk_method == "group_limited_greedy" else min(K, D)
        sent = one_hot.view(N, D, E // D).amax(-1)  # [N, D]: token sent to device d
        f_comm = sent.sum(0) * (D / (M * N))
        out["device"] = cfg.device_loss_alpha * (f_dev * P_dev).sum()
        out["comm"] = cfg.comm_loss_alpha * (f_comm * P_dev).sum()
    else:
        zero = scores.new_zeros(())
        out["device"], out["comm"] = zero, zero
    return out


def device_token_drop(affinity: torch.Tensor, topk_idx: torch.Tensor, batch_size: int, cfg: ModelConfig,
                      exempt_seq: torch.Tensor | None = None) -> torch.Tensor:
    """Which token-expert pairs survive device-level dropping. affinity/topk_idx [N, K] -> keep [N, K] bool.

    Each device (expert group) takes at most capacity = ceil(capacity_factor * N * K / D) pairs; beyond that the
    lowest-affinity pairs are dropped, except pairs of exempt sequences (a drop_exempt_fraction share, drawn with
    the global RNG unless given), which are never dropped.
    """
    N, K = topk_idx.shape
    D = cfg.n_expert_groups
    dev = (topk_idx // (cfg.n_routed_experts // D)).flatten()  # [N*K]
    if exempt_seq is None:
        exempt_seq = torch.rand(batch_size, device=affinity.device) < cfg.drop_exempt_fraction
    exempt = exempt_seq.repeat_interleave(N // batch_size)[:, None].expand(N, K).flatten()
    priority = affinity.detach().flatten().float() + 2.0 * exempt  # exempt pairs sort first
    by_priority = torch.argsort(-priority, stable=True)
    order = by_priority[torch.argsort(dev[by_priority], stable=True)]  # grouped by device, best first
    per_dev = torch.bincount(dev, minlength=D)
    starts = per_dev.cumsum(0) - per_dev
    rank = torch.arange(N * K, device=dev.device) - starts[dev[order]]
    capacity = math.ceil(cfg.capacity_factor * N * K / D)
    keep = torch.empty(N * K, dtype=torch.bool, device=dev.device)
    keep[order] = (rank < capacity) | exempt[order]
    return keep.view(N, K)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_experts = cfg.n_routed_experts
        self.gate = MoEGate(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        self.aux: dict[str, torch.Tensor] = {}  # balance losses of the last training forward
        self.load: torch.Tensor | None = None  # tokens per expert in the last forward (detached) [E]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        xf = x.reshape(-1, H)
        scores, topk_idx, topk_w = self.gate(xf)
        flat_e = topk_idx.flatten()
        if self.training:
            self.aux = balance_losses(scores.view(B, T, -1), topk_idx.view(B, T, -1), self.cfg)
            if self.cfg.token_drop:
                keep = device_token_drop(scores.gather(1, topk_idx), topk_idx, B, self.cfg)
                flat_e = torch.where(keep.flatten(), flat_e, self.n_experts)  # dropped -> past the last expert
        counts = torch.bincount(flat_e, minlength=self.n_experts + 1)[: self.n_experts]
        self.load = counts.detach()
        order = torch.argsort(flat_e, stable=True)
        if self.training and self.cfg.token_drop:
            order = order[: int(counts.sum())]
        token = order // topk_idx.shape[1]
        # index_select rather than xf[token]: its backward is an index_add, far cheaper than index_put
        out = self.experts(xf.index_select(0, token), counts, topk_w.flatten()[order])  # [M, H], gate-weighted
        y = xf.new_zeros(xf.shape, dtype=out.dtype).index_add_(0, token, out).view(B, T, H)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y
