"""Token sampling: greedy, temperature, top-k, top-p (nucleus), with per-row settings and per-row seeds."""

from __future__ import annotations

import torch


def _as_rows(v, B: int, device, dtype) -> torch.Tensor:
    t = torch.as_tensor(v, device=device, dtype=dtype)
    return t.expand(B) if t.dim() == 0 else t


def filter_logits(logits: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and top-p nucleus. top_k 0 / top_p 1 disable."""
    B, V = logits.shape
    top_k = _as_rows(top_k, B, logits.device, torch.long)
    top_p = _as_rows(top_p, B, logits.device, torch.float32)
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=logits.device)[None]
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    remove = ranks >= k[:, None]
    probs = sorted_logits.float().softmax(dim=-1)
    # drop a token when the tokens ranked above it already cover top_p (the top token always stays)
    remove |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, sorted_idx, sorted_logits)


def sample_next(logits: torch.Tensor, temperature=0.0, top_k=0, top_p=1.0,
                generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Rows with temperature 0 are greedy. `generators[b]` seeds row b."""
    B = logits.shape[0]
    temperature = _as_rows(temperature, B, logits.device, torch.float32)
    greedy = logits.argmax(dim=-1)
    if bool((temperature <= 0).all()):
        return greedy
    scaled = logits.float() / temperature.clamp(min=1e-6)[:, None]
    probs = filter_logits(scaled, top_k, top_p).softmax(dim=-1)
    if generators is None or all(g is None for g in generators):
        drawn = torch.multinomial(probs, 1).squeeze(1)
    else:
        drawn = torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=generators[b]).squeeze(1)
                           for b in range(B)])
    return torch.where(temperature > 0, drawn, greedy)
