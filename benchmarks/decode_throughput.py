"""Decode throughput: dsv2's engine vs transformers' `generate`, identical weights, greedy, on CPU.

    python benchmarks/decode_throughput.py                   # small preset, batch 1 and 16, prompt 64, 64 new
    python benchmarks/decode_throughput.py --batch 1 4 16 --repeats 5 --extra   # + FP8 weights / int8 KV rows

The same random `small` model is saved once and loaded by both (transformers' DeepseekV2ForCausalLM reads our
checkpoint). Each system runs the whole request (prefill + 64 greedy tokens, end-of-sequence ignored) `repeats`
times, interleaved with the other so that machine noise hits both alike; the best run counts. tokens/s = batch x
new tokens / wall time. "decode tok/s" leaves out the prefill (timed separately with 1 new token). Threads default
to 1: on a shared 2-core machine two OpenMP threads stall whenever the other core is busy.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from common import save, table

from dsv2 import DeepseekV2, ModelConfig, save_checkpoint
from dsv2.infer.engine import Engine, SamplingParams
from dsv2.model.fp8 import convert_model_fp8


def best_of(fns: dict, repeats: int) -> dict[str, float]:
    """Run each fn once to warm up, then `repeats` interleaved rounds; the fastest time of each."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--extra", action="store_true", help="also FP8 weights and 8-bit KV cache rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import DeepseekV2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = ModelConfig.from_preset(args.preset)
    model = DeepseekV2(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(model, d)
        hf = DeepseekV2ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # run all new tokens, like ignore_eos (no extra logits processor)
    n_new = args.new_tokens
    variants = {"dsv2": (model, None)}
    if args.extra:
        variants["dsv2 fp8 weights"] = (convert_model_fp8(copy.deepcopy(model)), None)
        variants["dsv2 int8 kv"] = (model, "int8")

    rows = []
    for B in args.batch:
        g = torch.Generator().manual_seed(B)
        ids = torch.randint(3, cfg.vocab_size, (B, args.prompt_len), generator=g)
        prompts = ids.tolist()
        budget = 2 * B * (args.prompt_len + n_new) * 4 * cfg.num_hidden_layers * cfg.kv_cache_dim

        def hf_run(n):
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                   pad_token_id=cfg.pad_token_id)[:, args.prompt_len:]

        engines = {name: Engine(m, budget, kv_cache_dtype=kv, max_batch_size=max(B, 1), prefill_chunk=4096)
                   for name, (m, kv) in variants.items()}

        def dsv2_run(engine, n):
            out = engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
            return torch.tensor([o.token_ids for o in out])

        fns = {"transformers": lambda: hf_run(n_new)}
        fns |= {name: (lambda e=e: dsv2_run(e, n_new)) for name, e in engines.items()}
        total = best_of(fns, args.repeats)
        pre = {"transformers": lambda: hf_run(1)} | {name: (lambda e=e: dsv2_run(e, 1)) for name, e in engines.items()}
        prefill = best_of(pre, args.repeats)
        ref = hf_run(n_new)
        for name, secs in total.items():
            out = ref if name == "transformers" else dsv2_run(engines[name], n_new)
            rows.append({
                "system": name, "batch": B, "tok/s": B * n_new / secs,
                "decode tok/s": B * (n_new - 1) / max(secs - prefill[name], 1e-9),
                "ms/step": 1000 * secs / n_new,
                "speedup": total["transformers"] / secs,
                "same tokens as HF": (out == ref).float().mean().item(),
            })
    cols = ["system", "batch", "tok/s", "decode tok/s", "ms/step", "speedup", "same tokens as HF"]
    print(f"decode throughput, preset {args.preset}, prompt {args.prompt_len}, {n_new} new tokens, greedy, "
          f"{args.threads} thread(s), best of {args.repeats}")
    print(table(rows, cols))
    path = save("decode_throughput", {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
