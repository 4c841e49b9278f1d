"""Decode time per token as the context grows: MLA's absorbed path vs the naive path, `small` preset, batch 1.

    python benchmarks/absorb_vs_naive.py                        # contexts 256 .. 8192
    python benchmarks/absorb_vs_naive.py --contexts 256 1024 --steps 8

Both run the model's forward over the same latent cache, switched by `model.attn_impl`: "naive" up-projects every
cached latent into per-head K/V at every step (W_UKV over the whole context), "absorb" folds W_UK into the query
and W_UV into the output and attends over the latents directly. The same forward over the engine's paged pool
(absorbed, the blocks gathered per layer) is the last column. Each context is prefilled once; `steps` decode steps are timed per path (best of
`repeats`), rewinding the cache between runs so the context length stays fixed.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import save, table

from dsv2 import DeepseekV2, ModelConfig
from dsv2.infer.engine import Engine, SamplingParams
from dsv2.infer.paged import PagedBatch


def best_ms(fn, steps: int, repeats: int) -> float:
    fn(1)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(steps)
        best = min(best, (time.perf_counter() - t) / steps)
    return best * 1000


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset)
    model = DeepseekV2(cfg).eval()
    rows = []
    for S in args.contexts:
        ids = torch.randint(3, cfg.vocab_size, (1, S))
        cache = model.new_cache(1, S + args.steps + 1)
        model.attn_impl = "auto"
        model(ids, cache=cache)  # prefill: fresh, naive SDPA
        tok = ids[:, -1:]

        def decode(impl):
            def run(n):
                model.attn_impl = impl
                for _ in range(n):
                    model(tok, cache=cache)
                cache.lengths -= n  # rewind: the context stays at S
                cache.lengths_host = [length - n for length in cache.lengths_host]
            return run

        # the engine: the same context in its block pool, then the model's forward over its paged blocks
        engine = Engine(model, num_blocks=S // 16 + 4, block_size=16, prefill_chunk=S, max_model_len=S + 16)
        rid = engine.add_request(ids[0].tolist(), SamplingParams(max_tokens=2, ignore_eos=True))
        engine.step()
        req = engine.requests[rid]
        table_ = [req.blocks + engine.pool.allocate(1)]

        def paged(n):
            model.attn_impl = "auto"
            for _ in range(n):
                model(tok, cache=PagedBatch(engine.pool, table_, [S]))

        r = {"context": S,
             "absorb ms/token": best_ms(decode("absorb"), args.steps, args.repeats),
             "naive ms/token": best_ms(decode("naive"), args.steps, args.repeats),
             "engine paged ms/token": best_ms(paged, args.steps, args.repeats)}
        r["naive / absorb"] = r["naive ms/token"] / r["absorb ms/token"]
        rows.append(r)
        print(f"  context {S}: absorb {r['absorb ms/token']:.2f} ms, naive {r['naive ms/token']:.2f} ms, "
              f"engine (paged) {r['engine paged ms/token']:.2f} ms", flush=True)
    model.attn_impl = "auto"
    print(f"decode time per token vs context, preset {args.preset}, batch 1, {args.threads} thread(s)")
    print(table(rows, ["context", "absorb ms/token", "naive ms/token", "naive / absorb", "engine paged ms/token"]))
    print(f"wrote {save('absorb_vs_naive', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
