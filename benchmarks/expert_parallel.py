"""Expert parallelism on gloo CPU processes: what device-limited routing saves in traffic, what the communication
balance loss does to the traffic's balance, the step time against one process, and the memory each rank holds.

    .venv/bin/python benchmarks/expert_parallel.py             # table, benchmarks/results/expert_parallel.json
    .venv/bin/python benchmarks/expert_parallel.py --steps 20 --skip-memory

Model: a MoE of hidden 128 with 16 routed experts, top-4, 2 layers (one dense first), on D = 2 and 4 processes
(one expert group per rank). Tokens sent: the hidden states a rank's dispatcher sends to other ranks per token
per MoE layer (each token goes once to each rank holding any of its experts), with plain greedy top-4 routing
and with device-limited routing (top-M groups = ranks, M = 1 of 2 and 2 of 4). Communication balance: the tokens
each rank receives over held-out batches, busiest / mean (1.0 is even), before and after a short training run
(stdlib sources, byte-level BPE of 512; AdamW, lr 3e-3) with the communication loss on (alpha 0.02, the
paper's) or off (0);
the expert- and device-level losses are off in both, so only the communication loss differs. Step time: one
training step (forward, backward, gradient sync, AdamW) of the same global batch on one process and on D.
Memory: the V2-Lite shape with its layers cut to 3 (one dense, two MoE), built on the meta device and
materialised in bfloat16, peak RSS per rank, for 1 and 2 ranks; and the full 27-layer model's bytes per rank by
count (float32 master weights), for D = 1, 2, 4, 8.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table  # noqa: E402

from dsv2.config import ModelConfig  # noqa: E402
from dsv2.model import DeepseekV2  # noqa: E402
from dsv2.train import expert_parallel as xp  # noqa: E402
from dsv2.train.parallel import run_local  # noqa: E402

HIDDEN, EXPERTS, TOP_K = 128, 16, 4
M_OF_D = {2: 1, 4: 2}


def bench_config(D: int, limited: bool, comm_alpha: float = 0.0) -> ModelConfig:
    routing = (dict(topk_method="group_limited_greedy", n_group=D, topk_group=M_OF_D[D]) if limited
               else dict(topk_method="greedy", n_group=D, topk_group=D))
    return ModelConfig.from_preset("tiny", vocab_size=512, hidden_size=HIDDEN, num_hidden_layers=2,
                                   n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=64,
                                   aux_loss_alpha=0.0, device_loss_alpha=0.0, comm_loss_alpha=comm_alpha,
                                   seq_aux=False, **routing)


def corpus_tokens(n_tokens: int) -> torch.Tensor:
    """The stdlib sources tokenized by a 512-token BPE trained on them (what the training tests use)."""
    import sysconfig

    from dsv2.tokenizer import train_tokenizer

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / f).read_text() for f in ("json/decoder.py", "json/encoder.py", "textwrap.py", "string.py",
                                               "bisect.py", "heapq.py", "fnmatch.py", "shlex.py", "argparse.py")]
    with tempfile.TemporaryDirectory() as d:
        tok = train_tokenizer(iter(texts), 512, d)
        ids = [i for t in texts for i in tok.encode(t)]
    return torch.tensor(ids[:n_tokens])


def _batches(tokens, rank, world, B, T, step):
    """Global batch `step` of B sequences of T tokens; this rank's contiguous slice."""
    n = (len(tokens) - 1) // T
    rows = [(step * B + i) % n for i in range(B)]
    x = torch.stack([tokens[r * T:(r + 1) * T] for r in rows])
    per = B // world
    return x[rank * per:(rank + 1) * per]


def _received(model, world) -> list[float]:
    """Tokens each rank received in the last forward, summed over MoE layers and over every sender."""
    sent = sum(m.dispatcher.sent.double() for m in model.moe_layers())
    dist.all_reduce(sent)
    return sent.tolist()


def _traffic_and_balance(rank, world, out, tokens, steps, B, T, lr, alpha):
    """Traffic with/without the device limit; balance before/after training with the comm loss on/off; time."""
    res = {}
    for limited in (False, True):
        cfg = bench_config(world, limited)
        torch.manual_seed(0)
        with torch.device("meta"):
            model = DeepseekV2(cfg)
        xp.apply_expert_parallel(model, dist.group.WORLD)
        xp.materialize(model, torch.device("cpu"))
        remote, units, n = 0.0, 0.0, 0
        with torch.no_grad():
            for s in range(4):
                x = _batches(tokens, rank, world, B, T, 1000 + s)
                model(x)
                for m in model.moe_layers():
                    sent = m.dispatcher.sent
                    remote += (sent.sum() - sent[rank]).item()
                    units += sent.sum().item()
                    n += x.numel()
        res[f"limited={limited}"] = {"remote_per_token": remote / n, "devices_per_token": units / n}
    for a in (0.0, alpha):
        cfg = bench_config(world, True, comm_alpha=a)
        torch.manual_seed(0)
        with torch.device("meta"):
            model = DeepseekV2(cfg)
        xp.apply_expert_parallel(model, dist.group.WORLD)
        xp.materialize(model, torch.device("cpu"))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

        def balance():
            model.eval()
            got = torch.zeros(world, dtype=torch.float64)
            with torch.no_grad():
                for s in range(4):
                    model(_batches(tokens, rank, world, B, T, 1000 + s))
                    got += torch.tensor(_received(model, world))
            model.train()
            return (got.max() / got.mean()).item()

        before = balance()
        times, comm = [], []
        for step in range(steps):
            x = _batches(tokens, rank, world, B, T, step)
            t0 = time.perf_counter()
            logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
            bal = model.balance_losses()
            (loss + bal["total"]).backward()
            xp.sync_grads(model)
            xp.clip_grad_norm(model, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            comm.append(bal["comm"].item())
        res[f"comm_alpha={a}"] = {"balance_before": before, "balance_after": balance(),
                                      "step_s": statistics.median(times[1:]), "lm_loss_last": loss.item()}
    if rank == 0:
        torch.save(res, out)


def _single_step_time(tokens, steps, B, T, lr) -> float:
    """The same training step on one process (local dispatcher, the whole global batch)."""
    cfg = bench_config(2, True)
    torch.manual_seed(0)
    model = DeepseekV2(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    times = []
    for step in range(steps):
        x = _batches(tokens, 0, 1, B, T, step)
        t0 = time.perf_counter()
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        (loss + model.balance_losses()["total"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def lite_config(layers: int) -> ModelConfig:
    return ModelConfig.from_preset("v2-lite", num_hidden_layers=layers)


def _memory(rank, world, out, layers):
    """Peak RSS of building V2-Lite (cut to `layers`) on meta and materialising this rank's part in bf16."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB on Linux)
    torch.set_default_dtype(torch.bfloat16)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = DeepseekV2(lite_config(layers))
    if world > 1:
        xp.apply_expert_parallel(model, dist.group.WORLD)
        xp.materialize(model, torch.device("cpu"))
    else:
        model.to_empty(device="cpu")
        model.init_weights()
    held = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    res = torch.tensor([base, held, peak], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(res, op=dist.ReduceOp.MAX)
    if rank == 0:
        torch.save(res.tolist(), out)


def bytes_per_rank(cfg: ModelConfig, D: int, itemsize: int = 4) -> float:
    """GiB of parameters one rank holds with the routed experts split over D ranks (by count)."""
    with torch.device("meta"):
        model = DeepseekV2(cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for p in xp.expert_params(model).values())
    return (total - experts + experts / D) * itemsize / 2**30


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="training steps for the balance and time figures")
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--comm-alpha", type=float, default=0.02, help="the communication loss weight when on")
    p.add_argument("--memory-layers", type=int, default=3)
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tokens = corpus_tokens(200_000)
    rows, record = [], {"args": vars(args)}
    single = _single_step_time(tokens, args.steps, args.batch, args.seq_len + 1, args.lr)
    for D in (2, 4):
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "res.pt"
            run_local(_traffic_and_balance, D, out, tokens, args.steps, args.batch, args.seq_len + 1, args.lr,
                  args.comm_alpha)
            res = torch.load(out)
        record[f"D={D}"] = res
        rows.append({"D": D, "M": M_OF_D[D],
                     "remote/tok greedy": res["limited=False"]["remote_per_token"],
                     "remote/tok M-limited": res["limited=True"]["remote_per_token"],
                     "bal before": res["comm_alpha=0.0"]["balance_before"],
                     "bal after, loss off": res["comm_alpha=0.0"]["balance_after"],
                     "bal after, loss on": res[f"comm_alpha={args.comm_alpha}"]["balance_after"],
                     "step s (1 proc)": single, "step s (D procs)": res["comm_alpha=0.0"]["step_s"]})
    print(table(rows, list(rows[0])))
    record["single_step_s"] = single
    if not args.skip_memory:
        mem = []
        for D in (1, 2):
            with tempfile.TemporaryDirectory() as d:
                out = Path(d) / "mem.pt"
                run_local(_memory, D, out, args.memory_layers)
                base, held, peak = torch.load(out)
            mem.append({"ranks": D, "layers": args.memory_layers, "params GiB/rank (bf16)": held,
                        "peak RSS GiB/rank": peak, "RSS before build": base})
        print()
        print(table(mem, list(mem[0])))
        full = [{"ranks": D, "V2-Lite 27 layers, fp32 params GiB/rank": bytes_per_rank(lite_config(27), D)}
                for D in (1, 2, 4, 8)]
        print()
        print(table(full, list(full[0])))
        record.update(memory_measured=mem, memory_by_count=full)
    print(f"\nwrote {save('expert_parallel', record)}")


if __name__ == "__main__":
    main()
