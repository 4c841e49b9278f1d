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


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# config.hidden_act -> the gate activation of every MLP and expert (GLU: act(gate) * up), under transformers' names
# (its ACT2FN): DeepSeek's checkpoints use silu; the gelu variants with a tanh approximation are one formula.
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "gelu_new": _gelu_tanh, "gelu_fast": _gelu_tanh,
               "gelu_pytorch_tanh": _gelu_tanh, "quick_gelu": _quick_gelu, "relu": F.relu}


class MLP(nn.Module):
    """Gated MLP (SwiGLU with the default silu); used for dense layers and for the shared experts (as one MLP of
    n_shared * moe_intermediate). act: a name in ACTIVATIONS (config.hidden_act)."""

    def __init__(self, hidden: int, inter: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act, self.act_fn = act, ACTIVATIONS[act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


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


# On CPU, beyond this many experts with rows one grouped matmul beats a loop over them (the CPU grouped_mm walks
# every expert); measured on the small preset (64 experts), where decode batches of 1-8 tokens stay far below it.
LOOP_MAX_ACTIVE_EXPERTS = 48


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored stacked. forward(x_sorted [M, H], counts [E]) with rows grouped by expert.

    impl: "grouped" (one torch._grouped_mm per projection), "loop" (one matmul per expert that has rows, into
    shared buffers: the small-batch path of decode), "gathered" (each row's expert weights gathered, then one
    batched matmul: static shapes, what torch.compile traces), or "auto": while compiling, grouped where its bf16
    kernel traces (training on CUDA) and gathered otherwise; else grouped for training and on CUDA, the loop where
    grouped_mm cannot run or, on CPU, when few experts have rows. Tests check the paths agree. Inference skips
    dispatch for a single token (`forward_token`, eager: one matmul per expert) and, on the gathered path, for
    batches of at most one row per expert on average (`forward_pairs`).
    """

    def __init__(self, n_experts: int, hidden: int, inter: int, act: str = "silu"):
        super().__init__()
        self.inter = inter
        self.act, self.act_fn = act, ACTIVATIONS[act]
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * inter, hidden))  # [E, 2I, H]: gate_proj ; up_proj
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, inter))  # [E, H, I]: down_proj
        self.impl = "auto"
        self._views: tuple | None = None  # per-expert transposed views for the loop, see _transposed

    def weights(self, dtype: torch.dtype, active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacks (of the `active` experts only, if given) in `dtype`: w13 [E', 2I, H], w2 [E', H, I]."""
        w13, w2 = self.w13, self.w2
        if active is not None:
            w13, w2 = w13.index_select(0, active), w2.index_select(0, active)
        return w13.to(dtype), w2.to(dtype)

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's w13 [2I, H] and w2 [H, I] in `dtype` (views when the dtype matches)."""
        return self.w13[e].to(dtype), self.w2[e].to(dtype)

    def gathers(self, x: torch.Tensor) -> bool:
        """Whether rows x take the gathered path: asked for, or "auto" while compiling where grouped_mm does not
        trace (it does in bf16 with torch 2.13; static shapes only, so no loop)."""
        if self.impl != "auto":
            return self.impl == "gathered"
        return torch.compiler.is_compiling() and not (_grouped_mm_ok(x) and x.dtype == torch.bfloat16)

    def _choose(self, x: torch.Tensor, counts: torch.Tensor) -> tuple[str, list[int] | None]:
        if self.impl != "auto":
            return self.impl, None
        if torch.compiler.is_compiling():
            return ("gathered" if self.gathers(x) else "grouped"), None
        if not _grouped_mm_ok(x):
            return "loop", None
        if x.device.type != "cpu" or self._needs_grad(x):
            return "grouped", None
        n = counts.tolist()  # the loop needs them anyway; a CPU sync costs nothing
        return ("loop" if sum(c > 0 for c in n) <= LOOP_MAX_ACTIVE_EXPERTS else "grouped"), n

    def forward(self, x: torch.Tensor, counts: torch.Tensor, row_weight: torch.Tensor | None = None) -> torch.Tensor:
        """row_weight [M]: the gate weight of each row, applied before the down projection (it is linear, and the
        activation is half the width of the output)."""
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # grouped_mm is not autocast-aware: cast as F.linear would
            x = x.to(torch.get_autocast_dtype(dev))
        impl, n = self._choose(x, counts)
        if impl == "grouped":
            active = None
            if not self._dense_weights():  # quantized stacks: dequantize only the experts that have rows
                active = counts.nonzero().flatten()
                counts = counts.index_select(0, active)
            w13, w2 = self.weights(x.dtype, active)
            offs = counts.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)  # [M, 2I]
            return torch._grouped_mm(self._act(h, row_weight), w2.transpose(1, 2), offs=offs)  # [M, H]
        if impl == "gathered":
            expert_of_row = torch.repeat_interleave(torch.arange(counts.shape[0], device=x.device), counts,
                                                    output_size=x.shape[0])
            return self._gathered(x, expert_of_row, row_weight)
        n = counts.tolist() if n is None else n
        if not self._needs_grad(x):
            return self._loop_into_buffers(x, n, row_weight)
        outs, start = [], 0  # differentiable loop (training where grouped_mm cannot run)
        for e, c in enumerate(n):
            if c:
                w13, w2 = self.expert_weights(e, x.dtype)
                w = None if row_weight is None else row_weight[start:start + c]
                outs.append(F.linear(self._act(F.linear(x[start:start + c], w13), w), w2))
                start += c
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])

    def forward_pairs(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """y [N, H] = sum_k topk_w[:, k] * expert_{topk_idx[:, k]}(x) for tokens x [N, H], one slot k at a time with
        each token's expert weights gathered: no sort, dispatch or combine, static shapes. The gathered path while
        N * K <= E (a compiled decode step at small batch): sorting pays off only once rows of one expert repeat,
        which then read the same weights one after another."""
        y = self._gathered(x, topk_idx[:, 0], topk_w[:, 0])
        for k in range(1, topk_idx.shape[1]):  # rows = x itself: no index arithmetic in the compiled kernel
            y = y + self._gathered(x, topk_idx[:, k], topk_w[:, k])
        return y

    def _gathered(self, x: torch.Tensor, expert_of_row: torch.Tensor, row_weight: torch.Tensor | None):
        """Rows x [M, H] through the experts expert_of_row [M], their weights gathered per row."""
        w13, w2 = self.weights(x.dtype, expert_of_row)  # [M, 2I, H], [M, H, I]
        h = torch.bmm(w13, x[:, :, None])[..., 0]
        return torch.bmm(w2, self._act(h, row_weight)[:, :, None])[..., 0]

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.w13.requires_grad)

    def _dense_weights(self) -> bool:
        return self.w13.dtype != torch.float8_e4m3fn

    def _act(self, h: torch.Tensor, row_weight: torch.Tensor | None) -> torch.Tensor:
        g, u = h.split([self.inter, self.inter], dim=-1)
        a = self.act_fn(g) * u
        return a if row_weight is None else a * row_weight[:, None].to(a.dtype)

    def _loop_into_buffers(self, x: torch.Tensor, n: list[int], row_weight: torch.Tensor | None) -> torch.Tensor:
        """The experts that got rows, one matmul each into shared buffers; the activation runs once for all."""
        h = x.new_empty(x.shape[0], 2 * self.inter)
        out = torch.empty_like(x)
        busy = [(e, self._transposed(e, x.dtype)) for e, c in enumerate(n) if c]  # FP8: dequantized once each
        xs, hs = x.split_with_sizes(n), h.split_with_sizes(n)  # per-expert row blocks, views made in one op each
        for e, (w13_t, _) in busy:
            torch.mm(xs[e], w13_t, out=hs[e])
        a_s, outs = self._act(h, row_weight).split_with_sizes(n), out.split_with_sizes(n)
        for e, (_, w2_t) in busy:
            torch.mm(a_s[e], w2_t, out=outs[e])
        return out

    def forward_token(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """One token x [1, H] through its experts topk_idx [K] with gate weights topk_w [K], no dispatch at all:
        y = sum_k w_k * expert_k(x), one addmm per expert (decode at batch 1). Inference only."""
        y = torch.zeros_like(x)
        for e, w in zip(topk_idx.tolist(), topk_w.tolist()):
            w13_t, w2_t = self._transposed(e, x.dtype)
            g, u = torch.mm(x, w13_t).split_with_sizes([self.inter, self.inter], dim=-1)
            y = torch.addmm(y, self.act_fn(g) * u, w2_t, alpha=w)
        return y

    def _transposed(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's w13^T [H, 2I] and w2^T [I, H]: views prepared once for full-precision stacks in `dtype` (kept
        while the stacks are the same storage, so in-place updates show through), else expert_weights'."""
        if self._dense_weights() and self.w13.dtype == dtype:
            key = (self.w13.data_ptr(), self.w2.data_ptr(), self.w13.shape[0])
            if self._views is None or self._views[0] != key:
                self._views = (key, [w.t() for w in self.w13.detach().unbind(0)],
                               [w.t() for w in self.w2.detach().unbind(0)])
            return self._views[1][e], self._views[2][e]
        w13, w2 = self.expert_weights(e, dtype)
        return w13.t(), w2.t()


def balance_losses(scores: torch.Tensor, topk_idx: torch.Tensor, cfg: ModelConfig,
                   n_devices: int | None = None) -> dict[str, torch.Tensor]:
    """The paper's three auxiliary losses. scores [B, T, E] float32, topk_idx [B, T, K]. Returns weighted losses.

    Devices are the expert groups (n_group), or the n_devices given (expert parallel: its ranks, each holding
    E / n_devices consecutive experts); with one device the device and communication losses are zero.
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
    D = n_devices or cfg.n_expert_groups
    if D > 1:
        P_dev = P.view(D, -1).sum(1)
        f_dev = f.view(D, -1).mean(1)
        # M: devices a token may reach (the device limit), so a uniform spread gives f'' = 1
        M = min(cfg.topk_group, D) if cfg.topk_method == "group_limited_greedy" else min(K, D)
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


class LocalDispatcher:
    """Dispatch and combine for experts that all live on this device: rows sorted by expert, then summed back.

    The MoE's seam: route (the gate) -> `dispatch` -> experts -> `combine`. Another dispatcher (expert parallel:
    all-to-all to the ranks holding each expert) is installed from outside the model by setting `moe.dispatcher`,
    the way torchtitan's `parallelize` applies parallelism to an unchanged model.
    """

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor, n_experts: int,
                 keep: torch.Tensor | None = None):
        """x [N, H], topk_idx/topk_w [N, K], keep [N, K] (False: dropped) -> (rows [M, H] grouped by expert,
        counts [n_experts], row weights [M], state for combine)."""
        flat_e = topk_idx.flatten()
        if keep is not None:
            flat_e = torch.where(keep.flatten(), flat_e, n_experts)  # dropped -> past the last expert
        # scatter_add rather than bincount: a static output shape, so torch.compile traces through it
        counts = flat_e.new_zeros(n_experts + (keep is not None)).scatter_add_(0, flat_e, torch.ones_like(flat_e))
        order = torch.argsort(flat_e, stable=True)
        if keep is not None:
            counts, kept = counts[:n_experts], counts[:n_experts].sum()
            order = order[:kept] if torch.compiler.is_compiling() else order[: int(kept)]
        token = order // topk_idx.shape[1]
        # index_select rather than x[token]: its backward is an index_add, far cheaper than index_put
        return x.index_select(0, token), counts, topk_w.flatten()[order], (token, x.shape)

    def combine(self, out: torch.Tensor, state) -> torch.Tensor:
        """Expert outputs [M, H] (gate-weighted) -> y [N, H], each token's rows summed."""
        token, shape = state
        return out.new_zeros(shape).index_add_(0, token, out)


class MoE(nn.Module):
    """DeepSeekMoE: route (the gate) -> dispatch -> routed experts -> combine, plus the shared experts.

    At inference with the local dispatcher, small batches skip dispatch and combine: a single token's K experts run
    one after another (`RoutedExperts.forward_token`, on CPU with `experts.impl` "auto" or "loop", eager), and
    where the experts gather (a compiled CPU step, or `impl` "gathered") N tokens with N * K <= E go through
    their gathered weights slot by slot (`forward_pairs`: no expert has more than one row on average, so sorting
    them together gains no weight reuse).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_experts = cfg.n_routed_experts
        self.gate = MoEGate(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.hidden_act)
            if cfg.n_shared_experts else None
        )
        self.dispatcher = LocalDispatcher()
        self.aux: dict[str, torch.Tensor] = {}  # balance losses of the last training forward
        self.load: torch.Tensor | None = None  # tokens per expert in the last forward (detached) [E]

    def max_pairs_tokens(self) -> int:
        """The most tokens that go through `forward_pairs` on the gathered path at inference (N * K <= E)."""
        return self.n_experts // self.cfg.num_experts_per_tok

    def _undispatched_path(self, x: torch.Tensor) -> str | None:
        """The path by which tokens x [N, H] may skip dispatch ("gathered": `_gathered_routed` decides, or "loop"),
        else None."""
        if self.training or type(self.dispatcher) is not LocalDispatcher:
            return None
        if self.experts.gathers(x):
            return "gathered"
        eager_cpu = x.device.type == "cpu" and not torch.compiler.is_compiling()
        return "loop" if x.shape[0] == 1 and eager_cpu and self.experts.impl in ("auto", "loop") else None

    def forward(self, x: torch.Tensor, drop_exempt: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, H]. drop_exempt [B]: sequences token dropping leaves whole (the model draws them once per
        forward so every layer keeps the same ones; drawn here if not given)."""
        B, T, H = x.shape
        xf = x.reshape(-1, H)
        scores, topk_idx, topk_w = self.gate(xf)  # route
        keep = None
        if self.training:
            # a dispatcher may bring its own devices and dropping (expert parallel: its ranks, at their capacity)
            self.aux = balance_losses(scores.view(B, T, -1), topk_idx.view(B, T, -1), self.cfg,
                                      getattr(self.dispatcher, "n_devices", None))
            if self.cfg.token_drop:
                drop = getattr(self.dispatcher, "token_drop", device_token_drop)
                keep = drop(scores.gather(1, topk_idx), topk_idx, B, self.cfg, drop_exempt)
        undispatched = self._undispatched_path(xf)
        if undispatched is not None:
            y = (self._gathered_routed(xf, topk_idx, topk_w) if undispatched == "gathered"
                 else self.experts.forward_token(xf, topk_idx[0], topk_w[0])).view(B, T, H)
            self.load = None
        else:
            y, counts = self._dispatched(xf, topk_idx, topk_w, keep)
            self.load = getattr(self.dispatcher, "routed_load", counts).detach()  # [E] this rank's tokens
            y = y.view(B, T, H)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y

    def _gathered_routed(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """The routed experts' output for tokens x [N, H] at inference on the gathered path: slot by slot without
        dispatch while N <= max_pairs_tokens(), else sorted by expert. A compiled decode step's batch size is
        symbolic (one graph serves every batch above 1): on CPU torch.cond takes the branch at run time, where a
        Python comparison would guard the graph on it and split it in two (a second graph family to compile). On
        CUDA the compiled step records a CUDA graph per batch size anyway, and graphs holding a cond may not be."""
        small = x.shape[0] <= self.max_pairs_tokens()
        if torch.compiler.is_compiling() and x.device.type == "cpu":
            return torch.cond(small, self.experts.forward_pairs, self._sorted_routed, (x, topk_idx, topk_w))
        return (self.experts.forward_pairs if small else self._sorted_routed)(x, topk_idx, topk_w)

    def _dispatched(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor,
                    keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """dispatch -> experts -> combine: (y [N, H], tokens per expert [E])."""
        rows, counts, row_w, state = self.dispatcher.dispatch(x, topk_idx, topk_w, self.n_experts, keep)
        return self.dispatcher.combine(self.experts(rows, counts, row_w), state), counts

    def _sorted_routed(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        return self._dispatched(x, topk_idx, topk_w)[0]  # one tensor: a torch.cond branch
