"""Real size on one machine: a V2-Lite-shaped random checkpoint (made by `dsv2 init`, cached) loaded and decoded,
each figure beside the bound this machine's measured matrix-vector bandwidth sets.

    python benchmarks/real_size.py --cache /work/cache/real_size --layers 4     # V2-Lite width, 4 of 27 layers
    python benchmarks/real_size.py --cache /work/cache/real_size                # the whole 15.7B model (~16 GB FP8)
    python benchmarks/real_size.py --preset small --cache /tmp/rs --skip-bf16   # quick, any preset

Figures (JSON in benchmarks/results/real_size.json):
- load: seconds and peak process memory (peak RSS, and peak anonymous memory sampled every 20 ms) of
  `load_checkpoint(bf16 dir, fp8=True)` (quantize on load) and of `load_checkpoint(fp8 dir)`, each in a fresh
  process; the bytes the loaded model holds.
- bandwidth: bytes/s of a matrix-vector product over weights far larger than the caches, for bf16 weights
  (torch.mm), float32, and FP8 weights (dsv2's CPU kernel, 1 byte per weight).
- active bytes per token: what one decode step must read (FP8 weights at 1 byte + scales, the rest in bf16; the
  routed experts' K of E, one embedding row), and for a batch of B the expected union of the experts its tokens
  pick under uniform routing. bound = bytes / measured bandwidth, per kind of weight.
- prefill of a --prompt-len prompt, decode s/token at batch 1 and tokens/s at batch --batch, through
  `dsv2.generate` (the public path; the Engine runs the same forward), greedy, after a warm-up.
Random weights route near-uniformly, as a trained model's balanced experts do on average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import save, table

from dsv2 import ModelConfig, generate
from dsv2.checkpoint import load_checkpoint
from dsv2.init import init_checkpoint
from dsv2.model import attention, fp8_cpu
from dsv2.model.fp8 import FP8Linear, FP8RoutedExperts, fp8_linear, quantize_fp8_blockwise, weight_nbytes
from dsv2.model.moe import RoutedExperts

# Run in a fresh process by load_figures: load, report seconds and peak memory as one JSON line.
_LOAD_CHILD = r"""
import json, resource, sys, threading, time
import torch
from dsv2.checkpoint import load_checkpoint
from dsv2.model.fp8 import weight_nbytes
peak = [0]
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0
def sample():
    while True:
        peak[0] = max(peak[0], anon())
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
torch.set_num_threads(int(sys.argv[3]))
t = time.perf_counter()
model = load_checkpoint(sys.argv[1], fp8=True if sys.argv[2] == "1" else None)
seconds = time.perf_counter() - t
peak[0] = max(peak[0], anon())
maps = sum(1 for line in open("/proc/self/maps") if ".safetensors" in line)
print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_anon": peak[0], "model_bytes": weight_nbytes(model), "mapped_shards_after": maps}))
"""


def checkpoints(cfg: ModelConfig, cache: Path, name: str, bf16: bool) -> dict[str, Path]:
    """The random checkpoints (bf16 and FP8, same seed), made by dsv2 init once and reused."""
    out = {}
    for kind in (["bf16"] if bf16 else []) + ["fp8"]:
        d = cache / f"{name}-{cfg.num_hidden_layers}l-{kind}"
        if not (d / "config.json").exists():
            t = time.perf_counter()
            init_checkpoint(cfg, d, fp8=kind == "fp8", max_shard_size="2GB")
            print(f"dsv2 init {d}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
        out[kind] = d
    return out


def load_figures(path: Path, fp8_on_load: bool, threads: int) -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    res = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(path), "1" if fp8_on_load else "0", str(threads)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": src})
    if res.returncode:
        raise RuntimeError(f"load of {path} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def matvec_bandwidth(kind: str, total_bytes: int = 768 * 2**20, rows: int = 2816, cols: int = 2048) -> float:
    """Bytes/s of x [1, cols] @ W^T over weights cycling through `total_bytes` (beyond any cache), best of 3."""
    per = rows * cols * (1 if kind == "fp8" else 2 if kind == "bf16" else 4)
    n = max(2, total_bytes // per)
    if kind == "fp8":
        w, s = quantize_fp8_blockwise(torch.randn(rows, cols) * 0.02)
        ws = [(w.clone(), s) for _ in range(n)]
        x = torch.randn(1, cols, dtype=torch.bfloat16)
        step = lambda: [fp8_linear(x, q, sc) for q, sc in ws]  # noqa: E731
    else:
        dtype = torch.bfloat16 if kind == "bf16" else torch.float32
        ws = [torch.randn(rows, cols, dtype=dtype) for _ in range(n)]
        x = torch.randn(1, cols, dtype=dtype)
        step = lambda: [torch.mm(x, w.t()) for w in ws]  # noqa: E731
    step()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t)
    return n * per / best


def active_bytes(model, batch: int = 1) -> dict[str, float]:
    """Weight bytes one decode step reads: {"fp8": ..., "dense": ...} (dense = bf16/float32 tensors). Routed
    experts: the expected number of distinct experts `batch` tokens pick (uniform routing, top-K of E each)."""
    cfg = model.config
    K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    share = 1 - (1 - K / E) ** batch  # expected fraction of experts hit at least once
    out = {"fp8": 0.0, "dense": 0.0}
    for name, mod in model.named_modules():
        if isinstance(mod, (FP8Linear, FP8RoutedExperts)):
            b = mod.nbytes() * (share if isinstance(mod, RoutedExperts) else 1)
            out["fp8"] += b
        elif isinstance(mod, RoutedExperts):
            out["dense"] += (mod.w13.nbytes + mod.w2.nbytes) * share
        elif isinstance(mod, torch.nn.Embedding):
            out["dense"] += mod.weight[0].nbytes * batch
        elif isinstance(mod, torch.nn.Linear):
            out["dense"] += mod.weight.nbytes
    return out


@torch.inference_mode()
def run_decode(model, prompt_len: int, new_tokens: int, batch: int) -> dict:
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    long = [torch.randint(3, V, (prompt_len,), generator=g).tolist()]
    short = [torch.randint(3, V, (16,), generator=g).tolist() for _ in range(batch)]
    generate(model, [long[0][:32]], 2)  # warm-up
    t = time.perf_counter()
    generate(model, long, 1)
    prefill = time.perf_counter() - t
    timed = {}
    for b, prompts in ((1, short[:1]), (batch, short)):
        t = time.perf_counter()
        generate(model, prompts, 1)
        first = time.perf_counter() - t
        t = time.perf_counter()
        out = generate(model, prompts, 1 + new_tokens)
        total = time.perf_counter() - t
        assert all(len(o) == 1 + new_tokens for o in out)  # no eos: random weights, eos_token_id not given
        timed[b] = (total - first) / new_tokens  # seconds per decode step
    return {"prefill_s": prefill, "prefill_tok_s": prompt_len / prefill, "decode_s_per_token_b1": timed[1],
            f"decode_tok_s_b{batch}": batch / timed[batch]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="v2-lite")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers (same layer shapes)")
    ap.add_argument("--cache", required=True, help="directory for the random checkpoints (kept between runs)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--skip-bf16", action="store_true", help="no bf16 checkpoint (no quantize-on-load figure)")
    ap.add_argument("--skip-load", action="store_true", help="no load figures (decode only)")
    ap.add_argument("--compare-dequantize", action="store_true",
                    help="also decode at batch 1 with the FP8 CPU kernel switched off (dequantize, then matmul)")
    ap.add_argument("--compare-bf16-absorbed", action="store_true",
                    help="also decode at batch 1 with MLA's absorbed W_UK/W_UV products in bf16 (not float32)")
    ap.add_argument("--out", default="real_size", help="results file name under benchmarks/results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    cfg = ModelConfig.from_preset(args.preset, **overrides)
    cache = Path(args.cache)
    ckpts = checkpoints(cfg, cache, args.preset, bf16=not args.skip_bf16)
    record: dict = {"preset": args.preset, "layers": cfg.num_hidden_layers, "fp8_cpu_kernel": fp8_cpu.available()}

    if not args.skip_load:
        rows = []
        if "bf16" in ckpts:
            rows.append({"load": "bf16 -> FP8 on load", **load_figures(ckpts["bf16"], True, threads)})
        rows.append({"load": "FP8 checkpoint", **load_figures(ckpts["fp8"], False, threads)})
        for r in rows:
            for k in ("peak_rss", "peak_anon", "model_bytes"):
                r[k + "_gib"] = r.pop(k) / 2**30
        record["load"] = rows
        print(table(rows, ["load", "seconds", "peak_rss_gib", "peak_anon_gib", "model_bytes_gib",
                           "mapped_shards_after"]))

    bw = {k: matvec_bandwidth(k) for k in (["bf16", "float32"] + (["fp8"] if fp8_cpu.available() else []))}
    record["matvec_bandwidth_gb_s"] = {k: v / 1e9 for k, v in bw.items()}
    print("matrix-vector bandwidth (GB/s): " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bw.items()))

    model = load_checkpoint(ckpts["fp8"], dtype=torch.bfloat16)
    model.eval()
    fp8_bw = bw.get("fp8", bw["bf16"])
    bounds = {}
    for b in (1, args.batch):
        ab = active_bytes(model, b)
        bounds[b] = {"active_gb": (ab["fp8"] + ab["dense"]) / 1e9,
                     "bound_s": ab["fp8"] / fp8_bw + ab["dense"] / bw["bf16"]}
    dec = run_decode(model, args.prompt_len, args.new_tokens, args.batch)
    record["decode"] = {**dec, "model_bytes_gib": weight_nbytes(model) / 2**30,
                        "active_gb_b1": bounds[1]["active_gb"], "bound_s_per_token_b1": bounds[1]["bound_s"],
                        f"active_gb_b{args.batch}": bounds[args.batch]["active_gb"],
                        f"bound_tok_s_b{args.batch}": args.batch / bounds[args.batch]["bound_s"]}
    if args.compare_dequantize and fp8_cpu.available():
        lib, fp8_cpu._lib = fp8_cpu._lib, False  # the fallback every FP8 product takes without the kernel
        try:
            slow = run_decode(model, 32, args.new_tokens, 1)["decode_s_per_token_b1"]
        finally:
            fp8_cpu._lib = lib
        record["decode"]["decode_s_per_token_b1_dequantize"] = slow
        print(f"batch-1 decode without the kernel (dequantize, then matmul): {slow:.2f} s/token")
    if args.compare_bf16_absorbed and attention.absorbed_dtype(torch.zeros(1, dtype=torch.bfloat16)) != torch.bfloat16:
        same = attention.absorbed_dtype
        attention.absorbed_dtype = lambda x: x.dtype  # what ran before: the products in the activations' bf16
        try:
            bf16 = run_decode(model, 32, args.new_tokens, 1)["decode_s_per_token_b1"]
        finally:
            attention.absorbed_dtype = same
        fp32 = run_decode(model, 32, args.new_tokens, 1)["decode_s_per_token_b1"]
        record["decode"].update(decode_s_per_token_b1_absorbed_bf16=bf16, decode_s_per_token_b1_absorbed_fp32=fp32)
        print(f"batch-1 decode, absorbed products in bf16: {bf16:.3f} s/token; in float32 (the default here): "
              f"{fp32:.3f} s/token")
    rows = [{"figure": "prefill tokens/s", "measured": dec["prefill_tok_s"], "bound": None},
            {"figure": "decode s/token, batch 1", "measured": dec["decode_s_per_token_b1"],
             "bound": bounds[1]["bound_s"]},
            {"figure": f"decode tokens/s, batch {args.batch}", "measured": dec[f"decode_tok_s_b{args.batch}"],
             "bound": args.batch / bounds[args.batch]["bound_s"]}]
    print(f"{args.preset}, {cfg.num_hidden_layers} layers, FP8 weights, bf16 compute, {threads} threads; active "
          f"bytes/token {bounds[1]['active_gb']:.2f} GB (batch {args.batch}: {bounds[args.batch]['active_gb']:.2f})")
    print(table(rows, ["figure", "measured", "bound"]))
    print(f"wrote {save(args.out, record)}")


if __name__ == "__main__":
    main()
