"""Training throughput (forward + backward tokens/s) of dsv2 vs transformers' DeepseekV2ForCausalLM on identical
weights, interleaved in one run, and the fraction of this machine's measured matmul peak that a step reaches.

    python benchmarks/train_throughput.py --threads 2                       # small and coarse shapes, CPU fp32
    python benchmarks/train_throughput.py --shape coarse --batch 4 --seq 128 --repeats 5
    python benchmarks/train_throughput.py --shape v2-lite --layers 4 --batch 4 --seq 512   # on CUDA: bf16 autocast

Shapes (benchmarks/common.py SHAPES): `small` (64 routed experts, top-6, group-limited: DeepSeekMoE's fine-grained
experts), `coarse` (16 routed experts of 4x the width, top-4, no groups), `both`, or any preset name. float32 on
CPU; on CUDA float32 weights under bf16 autocast. Each repeat times one step of each system, alternating, so
machine noise hits both alike; the median counts. Both compute the same loss (HF shifts labels itself).

Fraction of peak: the peak is one large square `torch.mm` measured in the same run (float32 2048^3 on CPU, bf16
8192^3 on CUDA; best of 5, before and after the steps; the higher counts). A step's matmul FLOPs are counted analytically (torch's FlopCounterMode counts neither
`_grouped_mm` nor CPU attention): 6 x activated parameters without the embedding table (the lookup is not a
matmul; lm_head is) x tokens, plus attention 6 x layers x heads x (qk_head_dim + v_head_dim) x seq per token (scores
and weighted values over the full sequence, forward + 2x backward, PaLM's convention that ignores causal
savings). The same count is used for both systems: it is the model's arithmetic, not what each implementation does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from common import SHAPES, matmul_peak_flops, save, shape_config, table  # noqa: E402

from dsv2 import DeepseekV2, save_checkpoint  # noqa: E402
from dsv2.info import parameter_counts  # noqa: E402


def step_flops(cfg, tokens: int, seq: int) -> dict:
    """Matmul FLOPs of one training step (forward + backward) over `tokens` tokens in sequences of `seq`."""
    n = parameter_counts(cfg)["activated_excluding_embedding"]
    dense = 6 * n * tokens
    attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq * tokens
    return {"activated_params_without_embedding": n, "dense_flops": dense, "attention_flops": attention,
            "step_flops": dense + attention}


def run_shape(name: str, args, device: str) -> list[dict]:
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    cfg = shape_config(name, **overrides)
    torch.manual_seed(0)
    with torch.device(device):  # V2-Lite width on a GPU: build in place, not on the host first
        ours = DeepseekV2(cfg)
    ours.train()
    hf = None
    if not args.no_hf:
        from transformers import DeepseekV2ForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(ours, d)
            hf = DeepseekV2ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
        hf = hf.to(device).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step_ours():
        with amp:
            logits = ours(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()) + ours.balance_losses()["total"]
        loss.backward()
        ours.zero_grad(set_to_none=True)
        sync()

    def step_hf():
        with amp:
            loss = hf(x, labels=x.clone()).loss  # HF shifts labels itself; same token count
        loss.backward()
        hf.zero_grad(set_to_none=True)
        sync()

    steps = {"dsv2": step_ours} | ({"transformers": step_hf} if hf is not None else {})
    for fn in steps.values():
        fn()  # warmup
    times = {k: [] for k in steps}
    for _ in range(args.repeats):  # interleaved
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    tokens = args.batch * args.seq
    flops = step_flops(cfg, tokens, args.seq)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k, secs in med.items():
        rows.append({"shape": name, "impl": k, "s/step": secs, "tokens/s": tokens / secs,
                     "speedup": med["transformers"] / secs if "transformers" in med else None,
                     "GFLOP/s": flops["step_flops"] / secs / 1e9, "times": times[k], **flops})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="both", help=f"both, {', '.join(SHAPES)}, or a preset name")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (e.g. 4 for v2-lite)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--no-hf", action="store_true", help="dsv2 only (also when transformers is not installed)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out:
        common.RESULTS = Path(args.out)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if not args.no_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed: timing dsv2 only")
            args.no_hf = True
    shapes = list(SHAPES) if args.shape == "both" else [args.shape]

    peak_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    peaks = [matmul_peak_flops(device, peak_dtype)]
    rows = []
    for name in shapes:
        rows += run_shape(name, args, device)
    peaks.append(matmul_peak_flops(device, peak_dtype))  # before and after: a shared machine changes under us
    peak = max(peaks)  # what this machine can do; a step slowed by the same noise reads low, not high
    for r in rows:
        r["of peak"] = r["GFLOP/s"] * 1e9 / peak
    print(f"train forward+backward, batch {args.batch} x seq {args.seq}, {device}, {torch.get_num_threads()} "
          f"thread(s), median of {args.repeats} interleaved")
    print(f"matmul peak ({str(peak_dtype).removeprefix('torch.')}, one large torch.mm): {peaks[0] / 1e9:,.1f} GFLOP/s "
          f"before, {peaks[1] / 1e9:,.1f} after; 'of peak' uses the higher")
    print(table(rows, ["shape", "impl", "s/step", "tokens/s", "speedup", "GFLOP/s", "of peak"]))
    path = save("train_throughput", {"args": vars(args), "device": device, "peak_flops": peak,
                                     "peak_flops_before_after": peaks, "peak_dtype": str(peak_dtype), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
