"""The DeepSeek-V2 decoder: embed -> [RMSNorm -> MLA -> RMSNorm -> MLP or DeepSeekMoE] x L -> RMSNorm -> lm_head.

Module names mirror DeepSeek's checkpoints (model.layers.N.self_attn.kv_b_proj, ...), so the checkpoint table only
has to handle the stacked routed experts.

    model = DeepseekV2(ModelConfig.from_preset("tiny"))
    logits = model(input_ids)                      # [B, T, vocab], training / full recompute
    cache = model.new_cache(batch_size, max_len)   # latent KV cache
    logits = model(ids, cache=cache, input_lengths=n)
"""

from __future__ import annotations

import torch
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.attention import LatentCache, LatentKVCache, RMSNorm, StepContext, attention
from dsv2.model.moe import MLP, MoE, MoEGate, RoutedExperts
from dsv2.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = attention(cfg, layer_idx)
        moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, ctx: StepContext, cache: LatentKVCache | None = None,
                impl: str = "auto") -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), ctx, cache, impl)
        x = self.post_attention_layernorm(h)
        return h + (self.mlp(x, ctx.drop_exempt) if isinstance(self.mlp, MoE) else self.mlp(x))


class DeepseekV2Body(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV2(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DeepseekV2Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)
        self.attn_impl = "auto"  # "auto" | "naive" | "absorb" for cached forwards
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    # ---- construction --------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Normal(0, std) for every matrix (paper: std 0.006), ones for norms, zeros for biases."""
        std = self.config.initializer_range if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, MoEGate)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RoutedExperts):
                m.w13.normal_(0.0, std)
                m.w2.normal_(0.0, std)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    def latent_down_weights(self) -> list[tuple[nn.Parameter, int]]:
        """Every layer's latent down-projections (W_DQ, W_DKV) as (weight, rows): the first `rows` rows of the
        weight project the hidden state into a latent that an RMSNorm then normalises."""
        return [w for layer in self.model.layers for w in layer.self_attn.latent_down_weights()]

    @torch.no_grad()
    def orthogonal_latents_(self) -> None:
        """Redraw the latent down-projections with orthogonal rows (columns when wider than the hidden size), at
        the same root-mean-square element as before: the latent then starts as an undistorted view of the hidden
        state (a square Gaussian matrix is badly conditioned). See `RunRecipe.freeze_latents`."""
        for w, rows in self.latent_down_weights():
            block = w[:rows]
            rms = block.float().pow(2).mean().sqrt()
            q = torch.nn.init.orthogonal_(torch.empty(block.shape, dtype=torch.float32))
            block.copy_(q * (rms / q.pow(2).mean().sqrt()))

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> LatentCache:
        p = self.lm_head.weight
        return LatentCache(self.config, batch_size, max_len, dtype=dtype or p.dtype, device=p.device)

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, cache: LatentKVCache | None = None,
                input_lengths: torch.Tensor | list[int] | None = None, output_positions: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]. The one forward: training, prefill, chunked prefill, decode.

        With a cache (any `LatentKVCache`: `new_cache()`, or the engine's paged batch), sequence b's tokens go to
        positions cache.lengths[b] + t for t < input_lengths[b] (the rest of the row is padding), and the cache
        lengths advance. output_positions [B] returns logits [B, vocab] at one index per row only (saves the
        lm_head over the whole prompt when generating).
        """
        return self.run_step(input_ids, cache, input_lengths, output_positions, return_hidden)

    def run_step(self, input_ids: torch.Tensor, cache: LatentKVCache | None = None,
                 input_lengths: torch.Tensor | list[int] | None = None, output_positions: torch.Tensor | None = None,
                 return_hidden: bool = False, layers=None) -> torch.Tensor:
        """`forward`, with the layers' part replaceable: `layers` (default `self.layers_forward`) is what
        dsv2.infer.engine.compiled puts under torch.compile. The host-side bookkeeping (the step context from the
        cache's Python lengths, the cache's advance) stays outside it, so the compiled code guards on no Python
        list: one graph serves every batch size above 1 and every cache length."""
        ctx = self.step_context(input_ids, cache, input_lengths)
        if layers is not None:
            ctx.kv_len = None  # read every slot the rows own (the mask hides those past a row's end)
            for t in (input_ids, ctx.positions, ctx.cos, ctx.sin):  # the batch size varies: one graph for all
                torch._dynamo.maybe_mark_dynamic(t, 0)
        out = (layers or self.layers_forward)(input_ids, ctx, cache, output_positions, return_hidden)
        if cache is not None:
            cache.advance(ctx.n_new)
        return out

    def layers_forward(self, input_ids: torch.Tensor, ctx: StepContext, cache: LatentKVCache | None,
                       output_positions: torch.Tensor | None, return_hidden: bool) -> torch.Tensor:
        """Embedding, the decoder layers, the final norm and the LM head over one step's context."""
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, ctx, cache, self.attn_impl)
        if output_positions is not None:
            h = h[torch.arange(h.shape[0], device=h.device), output_positions]
        h = self.model.norm(h)
        return h if return_hidden else self.lm_head(h)

    def step_context(self, input_ids: torch.Tensor, cache: LatentKVCache | None,
                     input_lengths: torch.Tensor | list[int] | None) -> StepContext:
        """Everything this forward's layers share, computed once: positions, RoPE factors, the cache bounds."""
        B, T = input_ids.shape
        dev = input_ids.device
        steps = torch.arange(T, device=dev)
        exempt = None
        if self.training and self.config.token_drop:  # one exempt set for every layer of this forward
            exempt = torch.rand(B, device=dev) < self.config.drop_exempt_fraction
        if cache is None:
            cos, sin = self.rotary(steps[None])  # [1, T, dr/2], broadcast over the batch
            return StepContext(steps[None].expand(B, T), cos, sin, drop_exempt=exempt)
        start = cache.lengths_host
        if B != len(start):
            raise ValueError(f"batch of {B} rows for a cache of {len(start)}")
        n = [T] * B if input_lengths is None else (
            input_lengths.tolist() if isinstance(input_lengths, torch.Tensor) else list(input_lengths))
        end = max(s + k for s, k in zip(start, n))
        if end > cache.max_len:
            raise ValueError(f"sequence would reach {end} tokens, past the cache's {cache.max_len}")
        positions = cache.lengths[:, None] + steps[None]  # [B, T]
        valid = None if min(n) == T else steps[None] < torch.tensor(n, device=dev)[:, None]
        cos, sin = self.rotary(positions)
        return StepContext(positions, cos, sin, valid, n, end, max(start) == 0, min(start) == max(start),
                           drop_exempt=exempt)

    # ---- training signals ----------------------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def balance_losses(self) -> dict[str, torch.Tensor | list]:
        """Balance losses of the last training forward: summed over MoE layers ("expert", "device", "comm",
        "total") and per layer ("per_layer": one dict per MoE layer). Add "total" to the LM loss."""
        per_layer = [m.aux for m in self.moe_layers() if m.aux]
        out: dict = {"per_layer": per_layer}
        zero = self.lm_head.weight.new_zeros((), dtype=torch.float32)
        for k in ("expert", "device", "comm"):
            out[k] = sum((d[k] for d in per_layer), zero)
        out["total"] = out["expert"] + out["device"] + out["comm"]
        return out

    def expert_load(self) -> torch.Tensor:
        """[n_moe_layers, n_routed_experts] tokens routed to each expert in the last forward."""
        loads = [m.load for m in self.moe_layers() if m.load is not None]
        return torch.stack(loads) if loads else torch.zeros(0)


def count_parameters(cfg: ModelConfig) -> dict:
    """Total and per-token activated parameters, built on the meta device (allocates nothing)."""
    with torch.device("meta"):
        model = DeepseekV2(cfg)
    total = sum(p.numel() for p in model.parameters())
    per_layer = []
    activated = total
    for i, layer in enumerate(model.model.layers):
        n = sum(p.numel() for p in layer.parameters())
        attn = sum(p.numel() for p in layer.self_attn.parameters())
        row = {"layer": i, "kind": "moe" if isinstance(layer.mlp, MoE) else "dense", "params": n, "attention": attn,
               "ffn": n - attn, "activated": n}
        if isinstance(layer.mlp, MoE):
            e = layer.mlp.experts
            per_expert = (e.w13.numel() + e.w2.numel()) // cfg.n_routed_experts
            inactive = per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
            row["activated"] = n - inactive
            activated -= inactive
        per_layer.append(row)
    embed = model.model.embed_tokens.weight.numel()
    head = 0 if cfg.tie_word_embeddings else model.lm_head.weight.numel()
    return {"total": total, "activated": activated, "embedding": embed, "lm_head": head, "layers": per_layer}
