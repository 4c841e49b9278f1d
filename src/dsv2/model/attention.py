"""Multi-head Latent Attention (MLA) and the latent KV cache.

Per token, MLA caches only the normalised KV latent c_KV [kv_lora_rank] and the shared, already-rotated RoPE key
[qk_rope_head_dim]. Two equivalent paths compute attention (DeepSeek's `attn_impl = "naive" | "absorb"`):

- naive: up-project the latents with W_UKV (`kv_b_proj`) into per-head K/V and run SDPA. Cheapest when every key
  is new (training, prefill of an empty cache).
- absorb: fold W_UK into the query and W_UV into the output, so scores and the weighted sum are taken directly
  against the cached latents; per-head K/V never exist. Cheapest for decode and chunked prefill.

Positions are per sequence: sequence b's new tokens sit at cache.lengths[b] + t, so batches of prompts with
different lengths are right-padded and need no position shifting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.rope import apply_rope, softmax_scale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32, cast back, then scale (same order as DeepSeek's reference and transformers)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


@dataclass
class StepContext:
    """Where this forward's tokens go. positions/valid: [B, T]; kv_len: keys to attend over (max end)."""

    positions: torch.Tensor
    valid: torch.Tensor
    kv_len: int
    fresh: bool  # every sequence starts at position 0 (nothing cached before this step)


class LatentCache:
    """A dense latent cache for a fixed batch: per layer `[B, max_len, kv_lora_rank]` + `[B, max_len, rope_dim]`.

    One extra slot per sequence (index max_len) swallows the writes of padding tokens, so writes never need a
    host sync or a boolean gather. The paged pool of the serving engine implements the same `update` interface.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        n = cfg.num_hidden_layers
        self.max_len = max_len
        self.kv_latent = torch.zeros(n, batch_size, max_len + 1, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.rope_key = torch.zeros(n, batch_size, max_len + 1, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def nbytes(self) -> int:
        return self.kv_latent.nbytes + self.rope_key.nbytes

    def update(self, layer: int, kv_latent: torch.Tensor, rope_key: torch.Tensor, ctx: StepContext):
        """Write this step's [B, T, r] latents and [B, T, dr] rope keys; return views of the first kv_len slots."""
        pos = torch.where(ctx.valid, ctx.positions, self.max_len)  # padding -> the spare slot
        b = torch.arange(pos.shape[0], device=pos.device)[:, None]
        self.kv_latent[layer][b, pos] = kv_latent.to(self.kv_latent.dtype)
        self.rope_key[layer][b, pos] = rope_key.to(self.rope_key.dtype)
        return self.kv_latent[layer, :, : ctx.kv_len], self.rope_key[layer, :, : ctx.kv_len]

    def advance(self, n_new: torch.Tensor) -> None:
        self.lengths += n_new


def linear_weight(mod: nn.Module) -> torch.Tensor:
    """The dense weight of a linear layer, dequantising FP8 block-quantised weights if needed."""
    deq = getattr(mod, "dequantized_weight", None)
    return deq() if callable(deq) else mod.weight


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        h, bias = cfg.hidden_size, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.n_heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, h, bias=bias)
        self.softmax_scale = softmax_scale(cfg)

    def project(self, x, cos, sin):
        """x [B, T, hidden] -> q_nope [B, T, H, dn], q_rope [B, T, H, dr] (rotated), kv_latent [B, T, r]
        (normalised), rope_key [B, T, dr] (rotated; one key shared by all heads)."""
        B, T, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(B, T, self.n_heads, self.qk_dim).split([self.nope_dim, self.rope_dim], dim=-1)
        kv_latent, rope_key = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin), self.kv_a_layernorm(kv_latent), apply_rope(rope_key, cos, sin)

    def forward(self, x, cos, sin, cache: LatentCache | None = None, ctx: StepContext | None = None,
                impl: str = "auto") -> torch.Tensor:
        q_nope, q_rope, kv_latent, rope_key = self.project(x, cos, sin)
        if cache is None:
            out = self._naive(q_nope, q_rope, kv_latent, rope_key, mask=None)
        else:
            kv_all, pe_all = cache.update(self.layer_idx, kv_latent, rope_key, ctx)
            if impl == "naive" or (impl == "auto" and ctx.fresh):
                if ctx.fresh:  # nothing older is cached: attend over this step's tokens, causally
                    out = self._naive(q_nope, q_rope, kv_latent, rope_key, mask=None)
                else:
                    out = self._naive(q_nope, q_rope, kv_all.to(x.dtype), pe_all.to(x.dtype), self._mask(ctx))
            else:
                out = self._absorbed(q_nope, q_rope, kv_all.to(x.dtype), pe_all.to(x.dtype), self._mask(ctx))
        return self.o_proj(out.flatten(2))

    @staticmethod
    def _mask(ctx: StepContext) -> torch.Tensor:
        """[B, T, S] bool: key j is visible to the query at position p iff j <= p."""
        keys = torch.arange(ctx.kv_len, device=ctx.positions.device)
        return keys[None, None, :] <= ctx.positions[:, :, None]

    def _naive(self, q_nope, q_rope, kv_latent, rope_key, mask):
        """Per-head K/V from the latents, then SDPA. mask None means causal over equal-length q and k."""
        B, S, _ = kv_latent.shape
        kv = self.kv_b_proj(kv_latent).view(B, S, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, rope_key[:, :, None, :].expand(B, S, self.n_heads, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        if mask is None and self.v_dim < self.qk_dim:
            # flash kernels (CPU and CUDA) want one head dim for q, k and v: zero-pad v, slice the output.
            # ~1.8x faster than the math fallback for training on CPU.
            v = F.pad(v, (0, self.qk_dim - self.v_dim))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None], is_causal=mask is None, scale=self.softmax_scale,
        )  # [B, H, T, dv or qk_dim]
        return out[..., : self.v_dim].transpose(1, 2)  # [B, T, H, dv]

    def _absorbed(self, q_nope, q_rope, kv_all, pe_all, mask):
        """Attention against the cached latents: kv_all [B, S, r], pe_all [B, S, dr]."""
        B, T, H, _ = q_nope.shape
        w = linear_weight(self.kv_b_proj).view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim:]  # [H, dn, r], [H, dv, r]
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk.to(q_nope.dtype))  # [B, T, H, r]
        scores = torch.bmm(q_latent.reshape(B, T * H, -1), kv_all.transpose(1, 2))
        scores = scores + torch.bmm(q_rope.reshape(B, T * H, -1), pe_all.transpose(1, 2))  # [B, T*H, S]
        scores = scores.view(B, T, H, -1).float() * self.softmax_scale
        scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(kv_all.dtype)
        out_latent = torch.bmm(probs.view(B, T * H, -1), kv_all).view(B, T, H, -1)  # [B, T, H, r]
        return torch.einsum("bthr,hdr->bthd", out_latent, w_uv.to(out_latent.dtype))  # [B, T, H, dv]
