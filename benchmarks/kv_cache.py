"""KV cache size per token, measured, and the quality cost of quantizing the cache and the weights.

    python benchmarks/kv_cache.py                       # tables 1 and 2 (trains a small model once, ~2-4 min)
    python benchmarks/kv_cache.py --no-quality          # table 1 only

Table 1: bytes per cached token (all layers), read from the storage of the engine's block pool: for `small` (a real
request's allocated blocks) and for `v2` (the pool built on the meta device: shapes and dtypes, no memory), next to
the formula (kv_lora_rank + qk_rope_head_dim) x layers x bytes, to what transformers' cache holds for the same
`small` model and prompt (measured from its past_key_values), and to MHA / GQA / MQA with the same heads.

Table 2: quality against full precision on a `small` model trained for a few hundred steps on Python's stdlib
sources (bytes as tokens; cached under runs/bench/): next-token (argmax) agreement and the largest logit
difference, teacher-forced over held-out text, and the held-out loss; KV variants read every key through the
quantized cache (chunked prefill on the absorbed path).
"""

from __future__ import annotations

import argparse
import copy
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from common import save, table

from dsv2 import DeepseekV2, ModelConfig, load_checkpoint, save_checkpoint
from dsv2.info import kv_cache_table
from dsv2.infer.engine import Engine, SamplingParams
from dsv2.infer.paged import PagedLatentPool, kv_bytes_per_token, logits_through_pool
from dsv2.infer.quant import kv_bits_per_element
from dsv2.model.fp8 import convert_model_fp8

ROOT = Path(__file__).resolve().parent.parent
BYTES = {torch.float32: 4, torch.bfloat16: 2}


def pool_bytes_per_token(pool: PagedLatentPool) -> float:
    """Bytes of the pool's storage (cache rows + scales) per token slot."""
    tensors = [pool.cache] + ([pool.scales] if pool.quantized else [])
    return sum(t.nbytes / t.shape[1] for t in tensors)


def size_rows() -> list[dict]:
    rows = []
    for preset, dtype in (("small", torch.float32), ("small", torch.bfloat16), ("v2", torch.bfloat16)):
        cfg = ModelConfig.from_preset(preset)
        L, d, bpe = cfg.num_hidden_layers, cfg.kv_cache_dim, BYTES[dtype]
        dt = str(dtype).removeprefix("torch.")
        device = "meta" if preset == "v2" else "cpu"  # v2: shapes and dtypes only
        for kind in (None, "fp8", "int8"):
            pool = PagedLatentPool(cfg, num_blocks=64, block_size=16, kv_dtype=kind, dtype=dtype, device=device)
            measured = pool_bytes_per_token(pool)
            row = {"model": preset, "dtype": dt, "cache": f"dsv2 MLA latent ({kind or dt})", "bytes/token": measured,
                   "formula": kv_bytes_per_token(cfg, kind, dtype), "bits/elem": 8 * measured / (L * d)}
            if preset == "small" and kind is None:
                # a real request through the engine: the blocks it holds
                engine = Engine(DeepseekV2(cfg).eval().to(dtype), num_blocks=64, block_size=16)
                rid = engine.add_request(list(range(3, 103)), SamplingParams(max_tokens=28, ignore_eos=True))
                for _ in range(27):
                    engine.step()
                req = engine.requests[rid]
                row["engine request"] = (f"{req.n_cached} tokens in {len(req.blocks)} blocks x "
                                         f"{engine.pool.block_bytes()} B")
            rows.append(row)
        if preset == "small" and dtype == torch.float32:
            rows.append({"model": preset, "dtype": dt, "cache": "transformers DynamicCache (measured)",
                         "bytes/token": hf_cache_bytes_per_token(cfg)})
        rows.append({"model": preset, "dtype": dt, "cache": "full per-head K/V, as transformers",
                     "bytes/token": L * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * bpe,
                     "formula": "L*H*(dqk+dv)*bytes"})
        for r in kv_cache_table(cfg, gqa_groups=min(8, cfg.num_attention_heads // 2)):
            if not r["mechanism"].startswith("MLA"):
                rows.append({"model": preset, "dtype": dt, "cache": f"{r['mechanism']} (paper Table 1, d_h=qk_nope)",
                             "bytes/token": r["elements_per_token"] * bpe})
    for r in rows:
        latent = next(x for x in rows if x["model"] == r["model"] and x["dtype"] == r["dtype"])
        r["x latent"] = r["bytes/token"] / latent["bytes/token"]
    return rows


@torch.inference_mode()
def hf_cache_bytes_per_token(cfg: ModelConfig, prompt_len: int = 64) -> float:
    from transformers import DeepseekV2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = DeepseekV2(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(model, d)
        hf = DeepseekV2ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    out = hf(torch.randint(3, cfg.vocab_size, (1, prompt_len)), use_cache=True)
    cache = out.past_key_values
    tensors = []
    for layer in getattr(cache, "layers", []):
        tensors += [layer.keys, layer.values]
    if not tensors:  # older cache layout
        tensors = [t for kv in cache for t in kv]
    return sum(t.nbytes for t in tensors) / prompt_len


# ---- table 2: quality --------------------------------------------------------------------------------------
def stdlib_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train = b"".join(p.read_bytes() for p in files[: len(files) * 9 // 10])
    held = b"".join(p.read_bytes() for p in files[len(files) * 9 // 10:])
    return torch.tensor(list(train), dtype=torch.long) + 3, torch.tensor(list(held), dtype=torch.long) + 3


def trained_small(path: Path, steps: int, log=print) -> DeepseekV2:
    """`small` trained with AdamW on stdlib bytes (token = byte + 3); saved to `path` and reused."""
    if (path / "config.json").exists():
        return load_checkpoint(path).eval()
    torch.manual_seed(0)
    model = DeepseekV2(ModelConfig.from_preset("small"))
    data, _ = stdlib_bytes()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(data) - 257, (8,), generator=g)
        x = torch.stack([data[i:i + 257] for i in idx.tolist()])
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        total = loss + model.balance_losses()["total"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for grp in opt.param_groups:
            grp["lr"] = 3e-3 * min(1.0, (step + 1) / 30) * (0.1 if step > 0.8 * steps else 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"  train step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)")
    for m in model.moe_layers():
        m.aux = {}
    save_checkpoint(model.eval(), path)
    return model


def quality_rows(model: DeepseekV2, n_seq: int, seq_len: int) -> list[dict]:
    _, held = stdlib_bytes()
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, len(held) - seq_len - 1, (n_seq,), generator=g).tolist()
    x = torch.stack([held[s:s + seq_len + 1] for s in starts])
    ids, targets = x[:, :-1], x[:, 1:]
    fp8 = convert_model_fp8(copy.deepcopy(model))
    with torch.inference_mode():
        ref = logits_through_pool(model, ids, None)
        variants = {
            "fp32 (reference)": ref,
            "KV int8": logits_through_pool(model, ids, "int8"),
            "KV fp8 e4m3": logits_through_pool(model, ids, "fp8"),
            "weights FP8 (128x128 blocks)": logits_through_pool(fp8, ids, None),
            "weights FP8 + KV int8": logits_through_pool(fp8, ids, "int8"),
        }
    def loss(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()

    rows = []
    for name, logits in variants.items():
        rows.append({"variant": name, "top-1 agreement": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                     "max |logit diff|": (logits - ref).abs().max().item(),
                     "mean |logprob diff|": (logits.log_softmax(-1) - ref.log_softmax(-1)).abs().mean().item(),
                     "held-out loss": loss(logits), "loss change": loss(logits) - loss(ref)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--trained", default=str(ROOT / "runs" / "bench" / "small-stdlib"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = size_rows()
    print("KV cache bytes per token (all layers)")
    cols = ["model", "cache", "bytes/token", "formula", "bits/elem", "x latent", "engine request"]
    print(table([{c: r.get(c, "") for c in cols} for r in rows], cols))
    print("8-bit caches, bits per element incl. their float32 scale: V2 latent (512 wide) "
          f"{kv_bits_per_element('int8', 512):.4f}, RoPE key (64 wide) {kv_bits_per_element('int8', 64):.4f}")
    record = {"size": rows}
    if not args.no_quality:
        model = trained_small(Path(args.trained), args.train_steps)
        q = quality_rows(model, n_seq=8, seq_len=256)
        print(f"\nquantization quality vs full precision, trained small ({args.trained}), 8 x 256 held-out tokens")
        print(table(q, ["variant", "top-1 agreement", "max |logit diff|", "mean |logprob diff|", "held-out loss",
                        "loss change"]))
        record["quality"] = q
    print(f"wrote {save('kv_cache', record)}")


if __name__ == "__main__":
    main()
