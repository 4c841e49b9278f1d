"""The paper's throughput claim in miniature: a fixed KV-cache memory budget, MLA's latent cache vs per-head K/V.

    python benchmarks/cache_budget.py                         # small preset, 32 MB budget, 128 + 128 tokens
    python benchmarks/cache_budget.py --budget 64MB --hf      # + transformers' generate at its batch limit

DeepSeek-V2 reports 5.76x the generation throughput of DeepSeek 67B, largely because its cache is 93% smaller, so
many more sequences decode at once. Here the same `small` weights decode N sequences (prompt P, G new tokens,
greedy) under one cache budget B:
- dsv2 engine: the paged latent pool sized to B (--kv-cache-memory), continuous batching; all N submitted at once,
  the pool admits as many as fit, with "reserve" admission (prompt + max_tokens must fit: never preempts) and
  with "optimistic" admission (prompts that fit are admitted, the newest are preempted and recomputed when the
  pool runs dry);
- latent, static: the model's forward over a dense latent cache, in waves of as many sequences as B holds;
- expanded K/V, static: the same model decoding through the naive path with expanded per-head K/V cached (what
  transformers does), in waves of as many sequences as B holds at that size;
- with --hf, transformers' generate itself, in waves of the expanded batch size.
Max concurrent sequences = B // (bytes per token x (P + G)); tokens/s = N x G / wall time. The v2 rows only do the
arithmetic for an 80 GB budget (bf16 cache).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import types

import torch
import torch.nn.functional as F
from common import save, table

from dsv2 import DeepseekV2, ModelConfig, save_checkpoint
from dsv2.infer.engine import Engine, SamplingParams
from dsv2.infer.paged import kv_bytes_per_token
from dsv2.utils import parse_size


class ExpandedKVCache:
    """transformers' way: per layer, per-head keys [B, S, H, dqk] and values [B, S, H, dv] (+ a spare slot)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int):
        L, H = cfg.num_hidden_layers, cfg.num_attention_heads
        self.max_len = max_len
        self.k = torch.zeros(L, batch_size, max_len + 1, H, cfg.qk_head_dim)
        self.v = torch.zeros(L, batch_size, max_len + 1, H, cfg.v_head_dim)
        self.lengths = torch.zeros(batch_size, dtype=torch.long)
        self.lengths_host = [0] * batch_size

    def advance(self, n_new: list[int]) -> None:
        self.lengths_host = [a + b for a, b in zip(self.lengths_host, n_new)]
        self.lengths = self.lengths + torch.tensor(n_new)

    @staticmethod
    def bytes_per_token(cfg: ModelConfig) -> int:
        return cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4


def expanded_attention(self, x, ctx, cache=None, impl="auto"):
    """MLA's projections, then naive attention over cached per-head K/V (replaces MLA.forward on a copy)."""
    B, T, _ = x.shape
    q_nope, q_rope, kv_rows = self.project(x, ctx)
    kv_latent, rope_key = kv_rows.split([self.kv_lora_rank, self.rope_dim], dim=-1)
    q = torch.cat([q_nope, q_rope], dim=-1)
    kv = self.kv_b_proj(kv_latent).view(B, T, self.n_heads, self.nope_dim + self.v_dim)
    k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
    rope_key = rope_key[:, :, None].expand(B, T, self.n_heads, self.rope_dim)
    k = torch.cat([k_nope, rope_key], dim=-1)
    pos = ctx.positions if ctx.valid is None else torch.where(ctx.valid, ctx.positions, cache.max_len)
    b = torch.arange(B)[:, None]
    cache.k[self.layer_idx][b, pos] = k
    cache.v[self.layer_idx][b, pos] = v
    K, V = cache.k[self.layer_idx][:, : ctx.kv_len], cache.v[self.layer_idx][:, : ctx.kv_len]
    mask = torch.arange(ctx.kv_len)[None, None, :] <= ctx.positions[:, :, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2),
                                         attn_mask=mask[:, None], scale=self.softmax_scale)
    return self.o_proj(out.transpose(1, 2).flatten(2))


@torch.inference_mode()
def static_waves(model, prompts, n_new: int, wave: int, make_cache) -> list[list[int]]:
    """Greedy decoding in waves of `wave` sequences, each wave with a fresh cache of that batch size."""
    outs = []
    for s in range(0, len(prompts), wave):
        ids = torch.tensor(prompts[s:s + wave])
        cache = make_cache(len(ids))
        logits = model(ids, cache=cache)[:, -1]
        toks = []
        for _ in range(n_new):
            tok = logits.argmax(-1)
            toks.append(tok)
            logits = model(tok[:, None], cache=cache)[:, -1]
        outs += torch.stack(toks, 1).tolist()
    return outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--budget", default="32MB")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=None, help="default: twice what the latent budget holds")
    ap.add_argument("--hf", action="store_true", help="also transformers' generate (slow)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset)
    model = DeepseekV2(cfg).eval()
    budget = parse_size(args.budget)
    ctx = args.prompt_len + args.new_tokens
    block = 16
    latent_tok, expanded_tok = kv_bytes_per_token(cfg), ExpandedKVCache.bytes_per_token(cfg)
    n_latent = budget // (latent_tok * -(-ctx // block) * block)
    n_expanded = budget // (expanded_tok * ctx)
    if n_expanded < 1:
        raise SystemExit(f"budget {args.budget} holds no sequence of {ctx} tokens with expanded K/V")
    N = args.requests or 2 * n_latent
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg.vocab_size, (N, args.prompt_len), generator=g).tolist()
    rows = []

    def run(name, fn, concurrent, bytes_tok):
        t = time.perf_counter()
        out = fn()
        secs = time.perf_counter() - t
        rows.append({"system": name, "bytes/token": bytes_tok, "max concurrent": concurrent,
                     "tok/s": N * args.new_tokens / secs, "seconds": secs})
        print(f"  {name}: {rows[-1]['tok/s']:.0f} tok/s", flush=True)
        return out

    def engine_run(admission):
        engine = Engine(model, budget, block_size=block, max_batch_size=max(N, 1), prefill_chunk=2048,
                        admission=admission)

        def go():
            ids = [engine.add_request(p, SamplingParams(max_tokens=args.new_tokens, ignore_eos=True))
                   for p in prompts]
            got = {i: [] for i in ids}
            while engine.has_work():
                for o in engine.step():
                    got[o.request_id] += o.token_ids
                go.peak = max(go.peak, len(engine.running))
            return [got[i] for i in ids]

        go.peak = 0
        out = run(f"dsv2 engine ({admission} admission)", go, None, latent_tok)
        rows[-1]["max concurrent"] = go.peak
        rows[-1]["preemptions"] = engine.num_preemptions
        return out

    ref = engine_run("reserve")
    engine_run("optimistic")
    lat = run("latent cache, static waves", lambda: static_waves(
        model, prompts, args.new_tokens, n_latent, lambda b: model.new_cache(b, ctx)), n_latent, latent_tok)
    expanded = copy.deepcopy(model)
    for layer in expanded.model.layers:
        layer.self_attn.forward = types.MethodType(expanded_attention, layer.self_attn)
    exp = run("expanded K/V (naive), static waves", lambda: static_waves(
        expanded, prompts, args.new_tokens, n_expanded, lambda b: ExpandedKVCache(cfg, b, ctx)), n_expanded,
        expanded_tok)
    same = [sum(a == b for a, b in zip(x, y)) / len(x) for x, y in ((ref, lat), (ref, exp))]
    if args.hf:
        from transformers import DeepseekV2ForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(model, d)
            hf = DeepseekV2ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()

        def hf_run():
            with torch.inference_mode():
                for s in range(0, N, n_expanded):
                    ids = torch.tensor(prompts[s:s + n_expanded])
                    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=cfg.pad_token_id)

        run("transformers generate", hf_run, n_expanded, expanded_tok)
    base = next(r for r in rows if r["system"].startswith("expanded"))
    for r in rows:
        r["x expanded tok/s"] = r["tok/s"] / base["tok/s"]
    v2 = ModelConfig.from_preset("v2")
    v2_latent = kv_bytes_per_token(v2, "bf16")
    v2_full = v2.num_hidden_layers * v2.num_attention_heads * (v2.qk_head_dim + v2.v_head_dim) * 2
    v2_seqs = {name: int(80e9 // (b * 4096)) for name, b in (("latent", v2_latent), ("full K/V", v2_full))}
    print(f"cache budget {args.budget}, preset {args.preset}, {N} requests of {args.prompt_len} + "
          f"{args.new_tokens} tokens, greedy, {args.threads} thread(s)")
    cols = ["system", "bytes/token", "max concurrent", "preemptions", "tok/s", "x expanded tok/s", "seconds"]
    print(table([{c: r.get(c, "") for c in cols} for r in rows], cols))
    print(f"same greedy tokens as the engine: latent static {same[0]:.3f}, expanded {same[1]:.3f}")
    print(f"v2 (bf16 cache, 80 GB, 4K-token sequences): {v2_seqs['latent']} sequences with the latent cache "
          f"({v2_latent} B/token) vs {v2_seqs['full K/V']} with full per-head K/V ({v2_full} B/token)")
    print(f"wrote {save('cache_budget', {'args': vars(args), 'rows': rows, 'agreement': same, 'v2_80GB': v2_seqs})}")


if __name__ == "__main__":
    main()
