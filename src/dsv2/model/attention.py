"""Multi-head Latent Attention (MLA), the per-forward step context, and the latent KV cache contract.

Per token, MLA caches only the normalised KV latent c_KV [kv_lora_rank] and the shared, already-rotated RoPE key
[qk_rope_head_dim], side by side in one row [c_KV ; k_rope]. Two equivalent paths compute attention (DeepSeek's
`attn_impl = "naive" | "absorb"`), switched by `impl`:

- naive: up-project the latents with W_UKV (`kv_b_proj`) into per-head K/V and run SDPA. Cheapest when every key
  is new (training, prefill of an empty cache).
- absorb: fold W_UK into the query and W_UV into the output, so [q_latent ; q_rope] is scored against the cached
  [c_KV ; k_rope] rows with one matmul and the weighted sum is taken over the latents; per-head K/V never exist.
  Cheapest for decode and chunked prefill. The absorbed weights are views of kv_b_proj's weight, prepared once
  (FP8 weights are dequantized into the compute dtype and kept). With bf16 activations on a CPU without native
  bf16 they are a float32 copy, kept while the weight is unchanged, and the two weight products run in float32:
  there a one-row bf16 batched matmul is several times slower (`absorbed_dtype`).

Everything that is the same for all layers of one forward (positions, RoPE factors, the key mask, where the
cache writes go) is computed once, in `StepContext`, by the model's forward. Positions are per sequence:
sequence b's new tokens sit at cache.lengths[b] + t, so batches of prompts with different lengths are
right-padded and need no position shifting.

Any object meeting `LatentKVCache` can be the cache: the dense `LatentCache` here (`dsv2.generate`) and the
serving engine's paged pool (`dsv2.infer.paged.PagedBatch`).

Standard attention for ablations (`cfg.attention_type` "mha" | "gqa" | "mqa", `GroupedQueryAttention`): the same
query path as MLA, keys and values projected per KV head with the same head dims ([nope ; rope] keys, RoPE on the
rope part of every head, partial-rotary style), each KV head shared by heads / n_kv query heads. It runs through
the same cache protocol: its cache row per token per layer is [keys of all KV heads ; values of all KV heads],
`cfg.kv_cache_dim` wide, so LatentCache, the paged pool and the engine serve it unchanged (only wider rows).
`attention(cfg, layer)` builds the configured one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.rope import apply_rope, softmax_scale

LATENT_NORM_EPS = 1e-6  # DeepSeek's reference normalises the q/kv latents with a fixed eps, not rms_norm_eps


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32, cast back, then scale (same order as DeepSeek's reference and transformers)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused op, weight inside
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


@dataclass
class StepContext:
    """What one forward's layers share. positions [B, T]; cos/sin [B or 1, T, dr/2] (YaRN mscale included).

    With a cache: valid [B, T] (None: no padding), n_new the rows' new token counts, kv_len keys attended over
    (the longest row's end; None: every slot the cache holds for these rows, what a compiled step reads, so that
    its shapes change with the cache's width, not at every token), fresh (nothing was cached before this step).
    drop_exempt [B]: sequences token dropping never touches (drawn once per training forward, the same in every MoE
    layer). Per-forward values derived on first use are memoised (`attn_bias`, and whatever the cache stores in
    `slots`).
    """

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    valid: torch.Tensor | None = None
    n_new: list[int] | None = None  # new tokens per row (input_lengths)
    kv_len: int | None = 0
    fresh: bool = True
    uniform: bool = True  # every row has the same number of cached keys before this step
    drop_exempt: torch.Tensor | None = None
    slots: object = None
    _bias: torch.Tensor | None = None
    _cis: torch.Tensor | None = None

    @property
    def cis(self) -> torch.Tensor | None:
        """Complex RoPE factors for apply_rope's fast path, made on first use (eager only: under torch.compile,
        None, and apply_rope traces the real formulation)."""
        if torch.compiler.is_compiling():
            return None
        if self._cis is None:
            self._cis = torch.complex(self.cos, self.sin)
        return self._cis

    def attn_bias(self, dtype: torch.dtype, n_keys: int) -> torch.Tensor | None:
        """Additive mask [B, T, n_keys] (0 or -inf) over the keys the cache returned, key j visible to the query at
        position p iff j <= p; None when a single new token per row sees every key (rows of one length, eager)."""
        T = self.positions.shape[1]
        if not torch.compiler.is_compiling() and T == 1 and self.uniform:  # (compiled: one graph for both kinds)
            return None
        if self._bias is None or self._bias.dtype != dtype:
            keys = torch.arange(n_keys, device=self.positions.device)
            hidden = keys[None, None, :] > self.positions[:, :, None]
            self._bias = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(hidden,
                                                                                                   float("-inf"))
        return self._bias


class LatentKVCache(Protocol):
    """The cache contract the model's forward runs over (met by LatentCache and dsv2.infer.paged.PagedBatch).

    `update` writes this forward's rows [B, T, r + dr] (c_KV ; k_rope) for one layer at ctx.positions (padding,
    where ctx.valid is False, must not land in a real slot) and returns every row's first ctx.kv_len cached rows
    [B, S, r + dr] in `dtype` (ctx.kv_len None: all max_len of them). `advance` adds the new tokens to the lengths
    once all layers ran.
    """

    lengths: torch.Tensor  # [B] tokens cached per row, on the model's device
    lengths_host: list[int]  # the same on the host: the step's bounds need no device sync
    max_len: int

    def update(self, layer: int, rows: torch.Tensor, ctx: StepContext, dtype: torch.dtype) -> torch.Tensor: ...

    def advance(self, n_new: list[int]) -> None: ...


class LatentCache:
    """A dense latent cache for a fixed batch: per layer `[B, max_len + 1, kv_lora_rank + qk_rope_head_dim]`.

    One extra slot per sequence (index max_len) swallows the writes of padding tokens, so writes never need a
    host sync or a boolean gather. Reads are views (no copy).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        self.max_len = max_len
        self.rows = torch.zeros(cfg.num_hidden_layers, batch_size, max_len + 1, cfg.kv_cache_dim, dtype=dtype,
                                device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.lengths_host = [0] * batch_size

    def nbytes(self) -> int:
        return self.rows.nbytes

    def update(self, layer: int, rows: torch.Tensor, ctx: StepContext, dtype: torch.dtype) -> torch.Tensor:
        if ctx.slots is None:  # once per forward: (batch index, position), padding -> the spare slot
            pos = ctx.positions if ctx.valid is None else torch.where(ctx.valid, ctx.positions, self.max_len)
            ctx.slots = (torch.arange(pos.shape[0], device=pos.device)[:, None], pos)
        # through the whole tensor, not a per-layer view (which torch.compile would copy back whole at every step)
        self.rows.index_put_((torch.tensor(layer, device=self.rows.device), *ctx.slots), rows.to(self.rows.dtype))
        out = self.rows[layer, :, : self.max_len if ctx.kv_len is None else ctx.kv_len]
        return out if out.dtype == dtype else out.to(dtype)

    def advance(self, n_new: list[int]) -> None:
        self.lengths_host = [a + b for a, b in zip(self.lengths_host, n_new)]
        self.lengths = self.lengths + torch.tensor(n_new, device=self.lengths.device)


def linear_weight(mod: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of a linear layer in `dtype` (the compute dtype), dequantising FP8 block-quantised weights
    straight into it (no bf16 detour, so FP8 decode equals FP8 prefill)."""
    deq = getattr(mod, "dequantized_weight", None)
    return deq(dtype) if callable(deq) else mod.weight.to(dtype)


@functools.cache
def _cpu_bf16_is_emulated() -> bool:
    """True on CPUs without native bf16 arithmetic (no AVX512-BF16 / AMX): there oneDNN's bf16 batched matmul at
    one query row is several times slower than float32, so MLA's absorbed weight products are taken in float32
    (`benchmarks/real_size.py --compare-bf16-absorbed` decodes both ways)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return not (" avx512_bf16" in flags or " amx_bf16" in flags)


def absorbed_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype MLA's absorbed products W_UK / W_UV run in for activations x: float32 for bf16 on CPUs that
    emulate bf16 (eager mode; see _cpu_bf16_is_emulated), else x's own dtype."""
    if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and _cpu_bf16_is_emulated()):
        return torch.float32
    return x.dtype


class _Query(nn.Module):
    """The query side every attention variant shares: W_Q, or MLA's low-rank W_DQ -> RMSNorm -> W_UQ."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        h, bias = cfg.hidden_size, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.n_heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * self.qk_dim, bias=False)
        self.softmax_scale = softmax_scale(cfg)

    def latent_down_weights(self) -> list[tuple[nn.Parameter, int]]:
        """The latent down-projections as (weight, rows): here W_DQ (`q_a_proj`, every row) when queries are
        compressed. Each feeds an RMSNorm, so only the rows' directions matter to the forward."""
        return [] if self.q_lora_rank is None else [(self.q_a_proj.weight, self.q_lora_rank)]

    def query(self, x: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> q_nope [B, T, H, dn], q_rope [B, T, H, dr] (rotated)."""
        B, T, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(B, T, self.n_heads, self.qk_dim).split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, ctx.cos, ctx.sin, ctx.cis)


def _sdpa(q, k, v, bias, causal: bool, scale: float, groups: int = 1) -> torch.Tensor:
    """SDPA over q [B, T, H, dqk], k [B, S, H / groups, dqk], v [B, S, H / groups, dv]: causal over equal-length q
    and k, or under bias [B, T, S] (None: every key visible). -> [B, T, H, dv]."""
    dv, dqk = v.shape[-1], q.shape[-1]
    if causal and dv < dqk:
        # flash kernels (CPU and CUDA) want one head dim for q, k and v: zero-pad v, slice the output.
        # ~1.8x faster than the math fallback for training on CPU.
        v = F.pad(v, (0, dqk - dv))
    if groups > 1:  # each key/value head serves `groups` consecutive query heads
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=None if bias is None else bias[:, None], is_causal=causal, scale=scale,
    )  # [B, H, T, dv or dqk]
    return out[..., :dv].transpose(1, 2)


class MLA(_Query):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.kv_lora_rank = cfg.kv_lora_rank
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, h, bias=bias)
        self._absorbed_views: tuple | None = None  # (source weight, W_UK, W_UV^T, version of a copy or None for views)

    def latent_down_weights(self) -> list[tuple[nn.Parameter, int]]:
        """W_DQ (if any) and W_DKV: the first kv_lora_rank rows of `kv_a_proj_with_mqa` (its last qk_rope_head_dim
        rows are the RoPE key's W_KR, which no norm follows)."""
        return super().latent_down_weights() + [(self.kv_a_proj_with_mqa.weight, self.kv_lora_rank)]

    def project(self, x: torch.Tensor, ctx: StepContext):
        """x [B, T, hidden] -> q_nope [B, T, H, dn], q_rope [B, T, H, dr] (rotated), kv_rows [B, T, r + dr]
        (normalised c_KV ; rotated k_rope, the one RoPE key shared by all heads)."""
        q_nope, q_rope = self.query(x, ctx)
        kv_latent, rope_key = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv_rows = torch.cat([self.kv_a_layernorm(kv_latent), apply_rope(rope_key, ctx.cos, ctx.sin, ctx.cis)], dim=-1)
        return q_nope, q_rope, kv_rows

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: LatentKVCache | None = None,
                impl: str = "auto") -> torch.Tensor:
        q_nope, q_rope, kv_rows = self.project(x, ctx)
        if cache is None:
            out = self._naive(q_nope, q_rope, kv_rows, None, causal=True)
        else:
            rows = cache.update(self.layer_idx, kv_rows, ctx, x.dtype)  # [B, S, r + dr]
            if impl == "absorb" or (impl == "auto" and not ctx.fresh):
                out = self._absorbed(q_nope, q_rope, rows, ctx.attn_bias(torch.float32, rows.shape[1]))
            elif ctx.fresh:  # nothing older is cached: attend over this step's tokens, causally
                out = self._naive(q_nope, q_rope, kv_rows, None, causal=True)
            else:
                out = self._naive(q_nope, q_rope, rows, ctx.attn_bias(q_nope.dtype, rows.shape[1]), causal=False)
        return self.o_proj(out.flatten(2))

    def _naive(self, q_nope, q_rope, kv_rows, bias, causal: bool):
        """Per-head K/V from the latents, then SDPA: causal over equal-length q and k, or under bias [B, T, S]
        (None: every key visible)."""
        B, S, _ = kv_rows.shape
        kv_latent, rope_key = kv_rows.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(kv_latent).view(B, S, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, rope_key[:, :, None, :].expand(B, S, self.n_heads, self.rope_dim)], dim=-1)
        return _sdpa(torch.cat([q_nope, q_rope], dim=-1), k, v, bias, causal, self.softmax_scale)  # [B, T, H, dv]

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, dn, r] and W_UV^T [H, r, dv] from kv_b_proj in `dtype`: views of the weight when it has that
        dtype (kept while it is the same tensor; a training step updates it in place, so the views follow), else a
        converted copy kept while the weight is unchanged (same tensor, same version), or the FP8 weight dequantized
        into `dtype` (FP8Linear keeps that copy the same way)."""
        src = getattr(self.kv_b_proj, "weight", None)
        cached = None if torch.compiler.is_compiling() else self._absorbed_views  # compiled code: plain views
        fp8 = src is None or src.dtype == torch.float8_e4m3fn
        if (cached is not None and not fp8 and cached[0] is src and cached[1].dtype == dtype
                and cached[3] in (None, src._version)):
            return cached[1], cached[2]
        w = linear_weight(self.kv_b_proj, dtype).view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv_t = w[:, : self.nope_dim], w[:, self.nope_dim:].transpose(1, 2)
        if not fp8 and not torch.compiler.is_compiling():
            self._absorbed_views = (src, w_uk, w_uv_t, None if src.dtype == dtype else src._version)
        return w_uk, w_uv_t

    def _absorbed(self, q_nope, q_rope, rows, bias):
        """Attention against the cached rows [B, S, r + dr]; bias [B, T, S] or None."""
        B, T, H, _ = q_nope.shape
        wd = absorbed_dtype(q_nope)
        w_uk, w_uv_t = self.absorbed_weights(wd)
        q_latent = torch.bmm(q_nope.reshape(B * T, H, -1).transpose(0, 1).to(wd), w_uk).to(q_nope.dtype)  # [H, B*T, r]
        q_cat = torch.cat([q_latent.transpose(0, 1).reshape(B, T * H, -1), q_rope.reshape(B, T * H, -1)], dim=-1)
        if T == 1 and bias is not None:  # [B, 1, S] broadcasts over the heads: mask, scale and scores in one op
            scores = torch.baddbmm(bias.to(rows.dtype), q_cat, rows.transpose(1, 2), alpha=self.softmax_scale)
        else:
            scores = torch.bmm(q_cat, rows.transpose(1, 2)).mul_(self.softmax_scale)  # [B, T*H, S]
            if bias is not None:
                scores = scores.view(B, T, H, -1).add_(bias[:, :, None].to(scores.dtype)).view(B, T * H, -1)
        probs = scores.softmax(dim=-1, dtype=torch.float32)
        if probs.dtype != rows.dtype:
            probs = probs.to(rows.dtype)
        out_latent = torch.bmm(probs, rows[..., : self.kv_lora_rank])  # [B, T*H, r]
        out = torch.bmm(out_latent.view(B * T, H, -1).transpose(0, 1).to(wd), w_uv_t)  # [H, B*T, dv]
        return out.transpose(0, 1).reshape(B, T, H, -1).to(q_nope.dtype)  # [B, T, H, dv]


class GroupedQueryAttention(_Query):
    """Standard attention with n_kv key/value heads (MHA: n_kv = heads, GQA: kv_heads groups, MQA: 1), for the
    ablations against MLA. Queries as MLA's; per KV head a key [k_nope ; RoPE(k_rope)] (qk_head_dim, RoPE on the
    rope part of each head) and a value (v_head_dim). Cache row per token: [keys (n_kv * dqk) ; values (n_kv * dv)].
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.n_kv = cfg.n_kv_heads
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.k_proj = nn.Linear(h, self.n_kv * self.qk_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.v_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, h, bias=bias)

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: LatentKVCache | None = None,
                impl: str = "auto") -> torch.Tensor:
        """impl is MLA's naive/absorb switch; standard attention has one path and ignores it."""
        B, T, _ = x.shape
        q = torch.cat(self.query(x, ctx), dim=-1)  # [B, T, H, dqk]
        k_nope, k_rope = self.k_proj(x).view(B, T, self.n_kv, self.qk_dim).split([self.nope_dim, self.rope_dim], -1)
        k = torch.cat([k_nope, apply_rope(k_rope, ctx.cos, ctx.sin, ctx.cis)], dim=-1)  # [B, T, n_kv, dqk]
        v = self.v_proj(x).view(B, T, self.n_kv, self.v_dim)
        groups = self.n_heads // self.n_kv
        if cache is None or ctx.fresh:  # every key is new: attend over this step's tokens, causally
            if cache is not None:
                cache.update(self.layer_idx, torch.cat([k.flatten(2), v.flatten(2)], dim=-1), ctx, x.dtype)
            out = _sdpa(q, k, v, None, True, self.softmax_scale, groups)
        else:
            rows = cache.update(self.layer_idx, torch.cat([k.flatten(2), v.flatten(2)], dim=-1), ctx, x.dtype)
            S = rows.shape[1]
            k_all, v_all = rows.split([self.n_kv * self.qk_dim, self.n_kv * self.v_dim], dim=-1)
            out = _sdpa(q, k_all.view(B, S, self.n_kv, self.qk_dim), v_all.view(B, S, self.n_kv, self.v_dim),
                        ctx.attn_bias(q.dtype, S), False, self.softmax_scale, groups)
        return self.o_proj(out.flatten(2))


def attention(cfg: ModelConfig, layer_idx: int) -> MLA | GroupedQueryAttention:
    """The attention module cfg.attention_type names: MLA, or standard MHA / GQA / MQA."""
    return MLA(cfg, layer_idx) if cfg.attention_type == "mla" else GroupedQueryAttention(cfg, layer_idx)
