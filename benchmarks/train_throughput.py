"""Training throughput (forward + backward tokens/s) of dsv2 vs transformers' DeepseekV2ForCausalLM, identical
weights, measured side by side in one run (interleaved), float32 on CPU or bf16 autocast on CUDA.

    python benchmarks/train_throughput.py [--preset small] [--batch 8] [--seq 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table, timeit  # noqa: E402

from dsv2 import DeepseekV2, ModelConfig, save_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from transformers import DeepseekV2ForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = ModelConfig.from_preset(args.preset)
    ours = DeepseekV2(cfg).to(device).train()
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(ours, d)
        hf = DeepseekV2ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    hf = hf.to(device).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step_ours():
        with amp:
            logits = ours(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()) + ours.balance_losses()["total"]
        loss.backward()
        ours.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    def step_hf():
        with amp:
            loss = hf(x, labels=ids[:, :-1].clone()).loss  # HF shifts labels itself; same token count
        loss.backward()
        hf.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    tokens = args.batch * args.seq
    t_ours, t_hf = [], []
    for _ in range(args.repeats):  # interleave so machine noise hits both alike
        t_ours.append(timeit(step_ours, warmup=1, repeats=1))
        t_hf.append(timeit(step_hf, warmup=1, repeats=1))
    t_ours, t_hf = sorted(t_ours)[len(t_ours) // 2], sorted(t_hf)[len(t_hf) // 2]
    rows = [
        {"impl": "dsv2", "s/step": t_ours, "tokens/s": tokens / t_ours, "speedup": t_hf / t_ours},
        {"impl": "transformers", "s/step": t_hf, "tokens/s": tokens / t_hf, "speedup": 1.0},
    ]
    print(f"train forward+backward, preset {args.preset}, batch {args.batch} x seq {args.seq}, {device}")
    print(table(rows, ["impl", "s/step", "tokens/s", "speedup"]))
    path = save("train_throughput", {"preset": args.preset, "batch": args.batch, "seq": args.seq,
                                     "device": device, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
