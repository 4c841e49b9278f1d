"""Decode throughput: `dsv2.generate` and the Engine vs transformers' `generate`, identical weights, greedy, CPU.

    python benchmarks/decode_throughput.py                     # small + coarse shapes, batch 1 and 16, 1 and 2 threads
    python benchmarks/decode_throughput.py --shape small --batch 1 --threads 1 --profile   # + what bounds decode
    python benchmarks/decode_throughput.py --extra             # + FP8 weights / int8 KV rows through the Engine
    python benchmarks/decode_throughput.py --compile           # + torch.compile'd decode steps (inductor)

Shapes: `small` (the preset: 64 fine-grained routed experts, top-6, group-limited) and `coarse` (the same model
with 16 routed experts of 4x the width, top-4, greedy routing: transformers' per-expert loop is cheapest there).
The same random model is saved once and loaded by transformers (DeepseekV2ForCausalLM reads our checkpoint). Each
system runs the whole request (prefill of a 64-token prompt + 64 greedy tokens, end-of-sequence ignored) `repeats`
times, interleaved with the others so that machine noise hits all alike; the best run counts. tokens/s = batch x
new tokens / wall time. "same tokens" is the share of generated tokens equal to transformers'.

"floor ms" is the least time a decode step can take on this machine: the weight bytes that step must read (every
matrix but the embedding table, and of the routed experts only those the batch's tokens were routed to, counted on
one real step of this model), streamed at the measured matrix-vector bandwidth of the thread count (one large
float32 matrix from memory). "floor x" = transformers' step time / the floor: the most any implementation could
reach against transformers there (the weights may stay partly in a large last-level cache between steps, so the true
floor may be a little lower).

"mm ms" is what the matrix products alone of one eager decode step of this batch take: every mm / addmm / bmm /
grouped-mm call of a real step (prefill, then one step, recorded by a dispatch mode) replayed back to back on the
same tensors, nothing else in between. The bandwidth floor assumes that a step streams its weights at the large
matrix-vector rate; this library's kernels on these narrow matrices (256 wide) and on a few rows at a time (a batch
of 16 gives each routed expert 1-6 rows) run well below it, and "mm x" = transformers' step / mm ms is the most an
implementation built on the same kernels and the same products could reach against transformers.

--profile runs one batch-1 decode step under torch.profiler and prints where its time goes: the number of tensor
ops, the share of wall time spent inside ops vs. in Python between them, and the time the step's weight bytes
would take at this machine's measured matrix-vector bandwidth (the memory-bandwidth bound).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
import time

import torch
from common import SHAPES, save, shape_config, table

from dsv2 import DeepseekV2, ModelConfig, generate, save_checkpoint
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


def load_hf(model: DeepseekV2):
    from transformers import DeepseekV2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(model, d)
        hf = DeepseekV2ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # run all new tokens, like ignore_eos (no extra logits processor)
    return hf


def run_shape(shape: str, args) -> list[dict]:
    torch.manual_seed(0)
    cfg = shape_config(shape)
    model = DeepseekV2(cfg).eval()
    hf = load_hf(model)
    n_new = args.new_tokens
    engines = {"dsv2 Engine": (model, None)}
    if args.extra:
        engines["dsv2 Engine fp8 weights"] = (convert_model_fp8(copy.deepcopy(model)), None)
        engines["dsv2 Engine int8 kv"] = (model, "int8")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for B in args.batch:
            g = torch.Generator().manual_seed(B)
            ids = torch.randint(3, cfg.vocab_size, (B, args.prompt_len), generator=g)
            prompts = ids.tolist()
            budget = 2 * B * (args.prompt_len + n_new) * 4 * cfg.num_hidden_layers * cfg.kv_cache_dim
            built = {name: Engine(m, budget, kv_cache_dtype=kv, max_batch_size=B, prefill_chunk=4096)
                     for name, (m, kv) in engines.items()}
            if args.compile:
                built["dsv2 Engine compiled"] = Engine(model, budget, max_batch_size=B, prefill_chunk=4096,
                                                       compile=True)

            def hf_run():
                with torch.inference_mode():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                      do_sample=False, pad_token_id=cfg.pad_token_id)
                return out[:, args.prompt_len:].tolist()

            runs = {"transformers": hf_run, "dsv2.generate": lambda: generate(model, prompts, n_new)}
            if args.compile:
                runs["dsv2.generate compiled"] = lambda: generate(model, prompts, n_new, compile=True)
            runs |= {name: (lambda e=e: [o.token_ids for o in e.generate(
                prompts, SamplingParams(max_tokens=n_new, ignore_eos=True))]) for name, e in built.items()}
            secs = best_of(runs, args.repeats)
            ref = torch.tensor(hf_run())
            floor = step_weight_bytes(model, ids) / matvec_bandwidth()
            mm_s = replay_seconds(step_matmuls(model, ids))
            for name, s in secs.items():
                same = (torch.tensor(runs[name]()) == ref).float().mean().item()
                rows.append({"shape": shape, "threads": threads, "batch": B, "system": name,
                             "tok/s": B * n_new / s, "ms/token step": 1000 * s / n_new,
                             "x transformers": secs["transformers"] / s, "same tokens": same,
                             "floor ms": 1000 * floor, "floor x": secs["transformers"] / n_new / floor,
                             "mm ms": 1000 * mm_s, "mm x": secs["transformers"] / n_new / mm_s})
    if args.profile:
        profile_step(model, cfg)
    return rows


@torch.inference_mode()
def step_weight_bytes(model: DeepseekV2, ids: torch.Tensor) -> int:
    """Weight bytes one decode step of the batch `ids` [B, T] must read: every parameter but the embedding table
    and the routed experts, plus each MoE layer's experts that the step's tokens were routed to (a prefill, then one
    decode step, its routing recorded by hooks on the gates)."""
    routed: list[torch.Tensor] = []

    @contextlib.contextmanager
    def recording():
        hooks = [moe.gate.register_forward_hook(lambda mod, inp, out: routed.append(out[1].unique()))
                 for moe in model.moe_layers()]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    one_decode_step(model, ids, recording())
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if "experts.w" not in n and "embed_tokens" not in n)
    experts = [moe.experts for moe in model.moe_layers()]
    return dense + sum(len(idx) * (e.w13[0].nbytes + e.w2[0].nbytes) for idx, e in zip(routed, experts))


MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm"}


@torch.inference_mode()
def step_matmuls(model: DeepseekV2, ids: torch.Tensor) -> list:
    """The matrix products (op, args, kwargs) of one eager decode step of the batch `ids` [B, T], after its
    prefill, in call order: weights as the same tensors, activations and outputs as the step made them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in MATMULS:
                calls.append((func, args, kwargs or {}))
            return func(*args, **(kwargs or {}))

    one_decode_step(model, ids, Record())
    return calls


@torch.inference_mode()
def one_decode_step(model: DeepseekV2, ids: torch.Tensor, during) -> None:
    """Prefill ids [B, T] into a new cache, then run one decode step (the greedy next tokens) inside the context
    manager `during`."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + 1)
    tok = model(ids, cache=cache, output_positions=torch.full((ids.shape[0],), ids.shape[1] - 1)).argmax(-1)
    with during:
        model(tok[:, None], cache=cache)


@torch.inference_mode()
def replay_seconds(calls: list, repeats: int = 20) -> float:
    """Best time of running the recorded products back to back (one warm-up round)."""
    best = float("inf")
    for i in range(repeats + 1):
        t = time.perf_counter()
        for func, args, kwargs in calls:
            func(*args, **kwargs)
        if i:
            best = min(best, time.perf_counter() - t)
    return best


def matvec_bandwidth() -> float:
    """Bytes/s this machine streams through a float32 matrix-vector product (the batch-1 decode kernel)."""
    w, x = torch.randn(8192, 8192), torch.randn(8192, 1)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        torch.mm(w, x)
        best = min(best, time.perf_counter() - t)
    return w.nbytes / best


@torch.inference_mode()
def profile_step(model: DeepseekV2, cfg: ModelConfig) -> None:
    from torch.profiler import ProfilerActivity, profile

    cache = model.new_cache(1, 200)
    model(torch.randint(3, cfg.vocab_size, (1, 64)), cache=cache)
    step = lambda: model(torch.randint(3, cfg.vocab_size, (1, 1)), cache=cache)  # noqa: E731
    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(20):
        step()
    wall = (time.perf_counter() - t) / 20
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.events() if e.cpu_parent is None and not e.name.startswith("[")]
    n_ops = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    in_ops = sum(e.cpu_time_total for e in events) / 1e6
    prompt = torch.randint(3, cfg.vocab_size, (1, 64))
    active = step_weight_bytes(model, prompt)  # weights read by one token
    bw = matvec_bandwidth()
    calls = step_matmuls(model, prompt)
    mm = replay_seconds(calls)
    print(f"\nbatch-1 decode step, {torch.get_num_threads()} thread(s): {wall * 1e3:.2f} ms wall; {n_ops} aten op "
          f"calls; top-level ops account for {in_ops * 1e3:.2f} ms ({in_ops / wall:.0%}); weights read per token "
          f"{active / 2**20:.1f} MiB -> {active / bw * 1e3:.3f} ms at the measured {bw / 1e9:.1f} GB/s "
          f"matrix-vector bandwidth ({active / bw / wall:.0%} of the step); its {len(calls)} matrix products "
          f"alone, replayed back to back: {mm * 1e3:.2f} ms ({mm / wall:.0%} of the step, "
          f"{active / mm / 1e9:.1f} GB/s of weights)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=[*SHAPES, "both"], default="both")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--extra", action="store_true", help="also FP8 weights and 8-bit KV cache rows")
    ap.add_argument("--profile", action="store_true", help="profile one batch-1 decode step per shape")
    ap.add_argument("--compile", action="store_true",
                    help="also dsv2.generate and the Engine with torch.compile'd decode steps (compiling takes minutes)")
    args = ap.parse_args()
    rows = []
    for shape in (SHAPES if args.shape == "both" else [args.shape]):
        rows += run_shape(shape, args)
        print(table(rows, list(rows[0])), flush=True)
    print(f"\ndecode throughput, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, best of "
          f"{args.repeats}")
    print(table(rows, list(rows[0])))
    print(f"wrote {save('decode_throughput', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
