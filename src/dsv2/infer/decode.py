"""The engine's fast decode step: one new token per row through the whole model, over the paged latent cache.

At decode batch sizes a CPU forward is bound by per-op overhead, not by arithmetic: the model's general forward
(any T, padding, training) issues ~1000 tensor ops per step for the small preset. This step does the same
arithmetic with far fewer ops and none of the generality:
- positions, RoPE factors, the key mask and the cache slots are computed once per step, not once per layer;
- MLA runs only the absorbed path: W_UK folded into the query, W_UV into the output, and [q_latent ; q_rope]
  scored against the cached [c_KV ; k_rope] rows with one matmul (the pool stores them side by side);
- RMSNorm is one fused op and RoPE one complex multiply on views (no copies in float32); C++ tensor methods
  are called rather than their Python wrappers (Tensor.split costs 3x split_with_sizes at these sizes);
- the routed experts of a small batch run as a loop over the experts that got tokens, into one buffer (the CPU
  grouped_mm walks every expert); a single token skips the dispatch altogether.
It holds only views of the model's parameters (no copies, so weight updates show through), and FP8 modules run
as in the model's forward (dequantized per call).

It is the fast half of a naive/fast pair: `Engine(fast_decode=False)` runs the model's forward instead, and
tests/infer/test_decode.py checks that the two agree (to float rounding) across the model variants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.infer.paged import PagedBatch
from dsv2.model import DeepseekV2
from dsv2.model.attention import MLA, RMSNorm, linear_weight
from dsv2.model.moe import MLP, MoE, RoutedExperts, _grouped_mm_ok

# beyond this many experts with tokens, one grouped matmul beats the per-expert loop on CPU
LOOP_MAX_ACTIVE_EXPERTS = 48


def _rms(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    # as RMSNorm.forward: normalise in float32, cast back, then scale
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:  # one op: the weight is applied inside
        return torch.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return norm.weight * torch.rms_norm(x.float(), (x.shape[-1],), eps=norm.eps).to(x.dtype)


def _rope(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs as one complex multiply, in float32: x [..., d], cis complex64 [..., d/2]."""
    f32 = x.dtype == torch.float32
    xf = (x if f32 else x.float()).view(*x.shape[:-1], -1, 2)
    try:
        xc = torch.view_as_complex(xf)  # a view when x is a float32 slice with even offset and strides
    except RuntimeError:
        xc = torch.view_as_complex(xf.contiguous())
    out = torch.view_as_real(xc * cis).flatten(-2)
    return out if f32 else out.to(x.dtype)


def _linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # a plain nn.Linear without the module-call machinery (a few microseconds each, 48 times a step)
    return F.linear(x, mod.weight, mod.bias) if type(mod) is nn.Linear else mod(x)


def _mlp(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    return _linear(mlp.down_proj, F.silu(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))


class FastDecoder:
    """decoder(tokens [B], batch: PagedBatch) -> logits [B, vocab]; the batch's lengths advance by one."""

    def __init__(self, model: DeepseekV2):
        self.model = model
        cfg = model.config
        self.H, self.dn, self.dr, self.dv = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                             cfg.v_head_dim)
        self.r = cfg.kv_lora_rank
        self.layers = []  # per layer: absorbed-weight views (None for FP8: dequantized per call), expert views
        for layer in model.model.layers:
            kv_b = layer.self_attn.kv_b_proj
            absorbed = None
            if type(kv_b) is torch.nn.Linear:
                w = kv_b.weight.view(self.H, self.dn + self.dv, self.r)
                absorbed = (w[:, : self.dn], w[:, self.dn:].transpose(1, 2))  # W_UK [H, dn, r], W_UV^T [H, r, dv]
            experts = None
            if isinstance(layer.mlp, MoE) and type(layer.mlp.experts) is RoutedExperts:
                ex = layer.mlp.experts
                experts = ([w.t() for w in ex.w13.unbind(0)], [w.t() for w in ex.w2.unbind(0)])  # [H, 2I], [I, H]
            self.layers.append((absorbed, experts))

    @staticmethod
    def supports(model: DeepseekV2) -> bool:
        return all(isinstance(layer.self_attn, MLA) for layer in model.model.layers)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        model, pool = self.model, batch.pool
        B = tokens.shape[0]
        pos = batch.lengths  # [B]: each row's new token goes here
        S = max(batch.lengths_host) + 1  # keys attended over
        if S > batch.max_len:
            raise ValueError(f"sequence would reach {S} tokens, past the cache's {batch.max_len}")
        # once per step: RoPE factors, the key mask (as an additive bias), the cache slots
        cos, sin = model.rotary(pos[:, None])  # [B, 1, dr/2], YaRN mscale included
        cis = torch.complex(cos, sin)
        keys = torch.arange(S, device=pos.device)
        bias = torch.zeros(B, 1, S, device=pos.device, dtype=pool.dtype)
        if min(batch.lengths_host) + 1 < S:  # rows of different lengths: mask each row's future
            bias.masked_fill_((keys[None] > pos[:, None])[:, None], float("-inf"))
        bs = pool.block_size
        write = batch.block_tables.gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs  # [B]

        h = model.model.embed_tokens(tokens)  # [B, hidden]
        for i, layer in enumerate(model.model.layers):
            absorbed, experts = self.layers[i]
            x = _rms(h, layer.input_layernorm)
            h = h + self._attention(layer.self_attn, absorbed, x, cis, bias, i, write, batch, S)
            x = _rms(h, layer.post_attention_layernorm)
            h = h + (self._moe(layer.mlp, experts, x) if isinstance(layer.mlp, MoE) else _mlp(layer.mlp, x))
        batch.advance(1)
        return _linear(model.lm_head, _rms(h, model.model.norm))

    def _attention(self, attn: MLA, absorbed, x, cis, bias, layer, write, batch, S) -> torch.Tensor:
        pool = batch.pool
        B, H, dn, dr, r = x.shape[0], self.H, self.dn, self.dr, self.r
        if attn.q_lora_rank is None:
            q = _linear(attn.q_proj, x)
        else:
            q = _linear(attn.q_b_proj, _rms(_linear(attn.q_a_proj, x), attn.q_a_layernorm))
        q_nope, q_rope = q.view(B, H, dn + dr).split_with_sizes([dn, dr], dim=-1)  # [B, H, dn], [B, H, dr]
        kv_latent, rope_key = _linear(attn.kv_a_proj_with_mqa, x).split_with_sizes([r, dr], dim=-1)
        # the query heads' RoPE slices and the shared key rotate together: [B, H + 1, dr]
        q_rope, rope_key = _rope(torch.cat([q_rope, rope_key[:, None]], dim=1), cis).split_with_sizes([H, 1], 1)
        pool.write(layer, write, _rms(kv_latent, attn.kv_a_layernorm), rope_key[:, 0])
        rows = pool.read(layer, batch.block_tables, S)  # [B, S, r + dr]: c_KV ; k_rope, in the compute dtype
        if absorbed is None:  # FP8 kv_b_proj: dequantize, as the model's forward does
            w = linear_weight(attn.kv_b_proj).view(H, dn + self.dv, r).to(x.dtype)
            absorbed = (w[:, :dn], w[:, dn:].transpose(1, 2))
        w_uk, w_uv_t = absorbed
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, r]
        q_cat = torch.cat([q_latent, q_rope], dim=-1)  # [B, H, r + dr]
        scores = torch.baddbmm(bias, q_cat, rows.transpose(1, 2), alpha=attn.softmax_scale)  # [B, H, S]
        probs = scores.softmax(dim=-1, dtype=torch.float32)
        if probs.dtype != rows.dtype:
            probs = probs.to(rows.dtype)
        out_latent = torch.bmm(probs, rows[..., :r])  # [B, H, r]
        out = torch.bmm(out_latent.transpose(0, 1), w_uv_t).transpose(0, 1)  # [B, H, dv]
        return _linear(attn.o_proj, out.reshape(B, H * self.dv))

    def _moe(self, moe: MoE, experts, x: torch.Tensor) -> torch.Tensor:
        _, topk_idx, topk_w = moe.gate(x)
        y = None
        if experts is not None and x.shape[0] == 1:
            y = self._one_token(moe.experts.inter, experts, x, topk_idx, topk_w)
        else:
            flat = topk_idx.flatten()
            order = torch.argsort(flat, stable=True)
            token = order // topk_idx.shape[1]
            counts = torch.bincount(flat, minlength=moe.n_experts)
            xs = x.index_select(0, token)  # [M, hidden], rows grouped by expert
            row_w = topk_w.flatten()[order]
            n = counts.tolist()
            if experts is not None and (sum(c > 0 for c in n) <= LOOP_MAX_ACTIVE_EXPERTS or not _grouped_mm_ok(xs)):
                out = self._expert_loop(moe.experts.inter, experts, xs, n, row_w)
            else:  # many experts busy (grouped_mm), or FP8 experts (dequantized per active expert by the module)
                out = moe.experts(xs, counts, row_w)
            y = x.new_zeros(x.shape, dtype=out.dtype).index_add_(0, token, out)
        if moe.shared_experts is not None:
            y = y + _mlp(moe.shared_experts, x)
        return y

    @staticmethod
    def _one_token(I: int, experts, x, topk_idx, topk_w) -> torch.Tensor:
        """A single token: its top-k experts one after another, in expert order (the model's summation order);
        y += w * (act @ W2) as one addmm (the model scales act first: equal up to rounding)."""
        w13_t, w2_t = experts
        y = torch.zeros_like(x)
        for e, w in sorted(zip(topk_idx[0].tolist(), topk_w[0].tolist())):
            g, u = torch.mm(x, w13_t[e]).split_with_sizes([I, I], dim=-1)
            y = torch.addmm(y, F.silu(g) * u, w2_t[e], alpha=w)
        return y

    @staticmethod
    def _expert_loop(I: int, experts, xs, counts: list[int], row_w) -> torch.Tensor:
        """The experts that got rows, one matmul each into shared buffers; the activation runs once for all."""
        w13_t, w2_t = experts
        h = xs.new_empty(xs.shape[0], 2 * I)
        s = 0
        for e, c in enumerate(counts):
            if c:
                torch.mm(xs[s:s + c], w13_t[e], out=h[s:s + c])
                s += c
        g, u = h.split_with_sizes([I, I], dim=-1)
        act = F.silu(g) * u * row_w[:, None].to(xs.dtype)  # the gate weight before the down projection
        out = torch.empty_like(xs)
        s = 0
        for e, c in enumerate(counts):
            if c:
                torch.mm(act[s:s + c], w2_t[e], out=out[s:s + c])
                s += c
        return out
