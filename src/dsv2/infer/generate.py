"""`dsv2.generate`: simple batched generation through the latent cache and the absorbed decode path.

Prompts of different lengths are right-padded; each sequence keeps its own positions in the cache, so no
left-padding or position shifting is needed. (The serving engine with continuous batching is dsv2.infer.engine.)
"""

from __future__ import annotations

import torch

from dsv2.infer.engine import compiled
from dsv2.infer.sampling import sample_next
from dsv2.model import DeepseekV2


@torch.inference_mode()
def generate(model: DeepseekV2, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, eos_token_id: int | None = None, seed: int | None = None,
             compile: bool | str = False) -> list[list[int]]:
    """Generate up to max_new_tokens for each prompt; returns the new tokens only (eos included if hit).

    compile: run the decode steps through torch.compile (made once per model and shared with the Engine; worth it
    for long-running use: the first call compiles for a minute or more on CPU, then each step skips the per-op
    overhead that bounds eager batch-1 decode)."""
    try:  # lists of ints, or anything iterable as such (tuples, a [B, T] tensor, numpy rows)
        prompts = [[int(t) for t in p] for p in prompts]
    except (TypeError, ValueError):
        raise ValueError("prompts must be a list of token-id lists") from None
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    device = model.lm_head.weight.device
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    ids = torch.tensor([p + [0] * (max(lengths) - len(p)) for p in prompts], dtype=torch.long, device=device)
    cache = model.new_cache(B, max(lengths) + max_new_tokens)
    gen = None
    if seed is not None:
        gen = [torch.Generator(device=device).manual_seed(seed + b) for b in range(B)]

    step_model = compiled(model, compile) if compile else model
    last = torch.tensor([n - 1 for n in lengths], device=device)
    logits = model(ids, cache=cache, input_lengths=lengths, output_positions=last)  # [B, V]
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n_out = torch.full((B,), max_new_tokens, device=device)
    for step in range(max_new_tokens):
        tok = logits.argmax(dim=-1) if temperature <= 0 else sample_next(logits, temperature, top_k, top_p, gen)
        out[:, step] = tok
        if eos_token_id is not None:
            hit = (tok == eos_token_id) & ~done
            n_out = torch.where(hit, step + 1, n_out)
            done |= hit
            if bool(done.all()):
                break
        if step + 1 < max_new_tokens:
            logits = step_model(tok[:, None], cache=cache)[:, 0]
    return [out[b, : int(n_out[b])].tolist() for b in range(B)]
