"""Pretraining: `dsv2 pretrain` trains a DeepSeek-V2 preset on a text corpus with the paper's recipe.

    dsv2 pretrain --preset small --out runs/small                  # the Python stdlib sources as the corpus
    dsv2 pretrain --preset small --data corpus/ --out runs/x --max-steps 2000 --config recipe.toml
    dsv2 pretrain --out runs/x --resume                            # continue from the latest checkpoint
    torchrun --nproc-per-node 2 -m dsv2.cli pretrain ... [--fsdp]  # data parallel (gloo on CPU, nccl on CUDA)

The run directory holds everything:
    tokenizer/                 the tokenizer trained on the corpus (unless --tokenizer names one)
    tokens.bin, tokens.bin.json   the corpus tokenized once (memory-mapped; reused while corpus and tokenizer match)
    checkpoints/step-00001000/ config.json + model.safetensors (HF layout) + tokenizer files, and the trainer's
                               state: trainer_state.json (step, recipe, data position) and trainer_state.pt
                               (optimizer, RNG; tensors only, read back with torch.load(weights_only=True))
    metrics.jsonl, loss.png, expert_load.png

A step: the global batch (ramped, data-parallel ranks take contiguous slices) is split into micro-batches;
each adds (LM loss + balance losses) x its share of the batch to the gradients; clip to grad_clip; AdamW.
Resuming restores weights, optimizer, schedule position, data position and RNG, so an interrupted run continues
with exactly the losses it would have had (tests/train/test_pretrain.py checks it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dsv2.checkpoint import load_checkpoint, load_config, save_checkpoint
from dsv2.config import PRESETS, ModelConfig
from dsv2.data import BatchLoader, PackedDataset, build_token_file, iter_corpus_texts
from dsv2.model import DeepseekV2
from dsv2.tokenizer import Tokenizer, train_tokenizer
from dsv2.train import parallel, plots
from dsv2.train.optim import batch_size_at, build_optimizer, lr_at
from dsv2.train.recipe import Recipe, field_help, field_types, load_toml

CKPT_DIR = "checkpoints"
STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class TrainingError(RuntimeError):
    """Training stopped and cannot go on as asked: the loss diverged, or a checkpoint could not be written."""


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits [B, T, V], targets [B, T]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (writes are atomic, so a listed one is whole)."""
    root = Path(out) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_JSON).is_file())


def latest_checkpoint(out: str | Path) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def read_trainer_state(ckpt: str | Path) -> dict:
    return json.loads((Path(ckpt) / STATE_JSON).read_text())


def pretrain(recipe: Recipe, out: str | Path, resume: bool = False, stop_after: int | None = None,
             progress: bool = True) -> dict:
    """Train as the recipe says, writing into `out`; returns a summary (step, loss, eval_loss, checkpoint,
    stopped_by: "done" | "stop_after" | "SIGINT" | "SIGTERM", tokens_per_s, ...). Under torchrun every process
    calls this. `stop_after` ends the run (with a checkpoint) after that step without changing the schedule."""
    recipe.validate()
    d = parallel.init_distributed()
    try:
        run = _Run(recipe, Path(out), d, progress)
        run.setup(resume)
        return run.train(stop_after)
    finally:
        parallel.shutdown(d)


class _Run:
    def __init__(self, recipe: Recipe, out: Path, d: parallel.Dist, progress: bool):
        if recipe.data is not None:  # absolute, so a resume from another directory finds the corpus
            recipe = dataclasses.replace(recipe, data=os.path.abspath(recipe.data))
        self.r, self.out, self.d, self.progress = recipe, out, d, progress and d.is_main
        self.bar: tqdm | None = None
        self.stop_signal: int | None = None

    def say(self, msg: str) -> None:
        if self.d.is_main:
            tqdm.write(msg)  # above the progress bar when there is one

    # ---- setup ---------------------------------------------------------------------------------------------
    def setup(self, resume: bool) -> None:
        r, d, out = self.r, self.d, self.out
        if r.batch_size % d.world_size or r.batch_size_start % d.world_size:
            raise ValueError(f"batch sizes ({r.batch_size_start}, {r.batch_size}) must be divisible by the "
                             f"number of processes ({d.world_size})")
        out.mkdir(parents=True, exist_ok=True)
        ckpt = latest_checkpoint(out)
        if ckpt is not None and not resume:
            raise ValueError(f"{out} already holds checkpoints (latest: {ckpt.name}); pass --resume to continue "
                             "that run, or choose another --out")
        if resume and ckpt is None:
            self.say(f"no checkpoint in {out}: starting from scratch")
        self.ckpt = ckpt if resume else None
        state = read_trainer_state(ckpt) if self.ckpt else None
        tensors = torch.load(self.ckpt / STATE_PT, weights_only=True, map_location="cpu") if self.ckpt else None
        if self.ckpt:
            self.say(f"resuming from {self.ckpt} (step {state['step']})")

        # tokenizer: the checkpoint's, the one named, or one trained on the corpus at the preset's vocab size
        if self.ckpt:
            self.tok = Tokenizer.load(self.ckpt)
        elif r.tokenizer:
            self.tok = Tokenizer.load(r.tokenizer)
        else:
            vocab = ModelConfig.from_preset(r.preset, **r.model).vocab_size
            parallel.on_main(d, lambda: self._train_tokenizer(vocab))
            self.tok = Tokenizer.load(out / "tokenizer")

        cfg = load_config(self.ckpt) if self.ckpt else ModelConfig.from_preset(r.preset, **r.model)
        if self.tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {self.tok.vocab_size} tokens but the model's vocab_size is "
                             f"{cfg.vocab_size} (preset {r.preset!r}): use a smaller tokenizer or set "
                             "[model] vocab_size in the recipe")
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = self.tok.bos_id, self.tok.eos_id, self.tok.pad_id
        self.cfg = cfg

        # data, tokenized once by rank 0
        stats = parallel.on_main(d, lambda: build_token_file(
            r.data, self.tok, out / "tokens.bin", max_bytes=r.max_bytes, progress=self.progress,
            text_field=r.text_field))
        ds = PackedDataset(out / "tokens.bin", r.seq_len, r.val_fraction)
        if stats:
            self.say(f"data: {stats['files']} files, {stats['bytes']:,} bytes, {stats['documents']:,} documents -> "
                     f"{stats['tokens']:,} tokens{' (cached)' if stats['reused'] else ''}; {ds.n_train} train / "
                     f"{ds.n_val} held-out blocks of {r.seq_len} tokens")
        self.loader = BatchLoader(ds, seed=r.seed, rank=d.rank, world_size=d.world_size)

        # model and optimizer
        self.device = d.device
        self.autocast_dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else None,
                               "bfloat16": torch.bfloat16, "float32": None}[r.dtype]
        torch.manual_seed(r.seed)
        if self.ckpt:
            model = load_checkpoint(self.ckpt, config=cfg)
        else:
            model = DeepseekV2(cfg)
            if r.init_std is not None:
                model.init_weights(r.init_std)
        model.to(self.device).train()
        if r.compile:
            if self.device.type == "cuda":
                model.compile()
            else:
                self.say("note: --compile is for CUDA; training eagerly on CPU")
        self.raw = model
        self.model = parallel.wrap(model, d, r.fsdp)
        self.opt = build_optimizer(self.model, r.lr, r.weight_decay, (r.beta1, r.beta2))
        n_moe = len(model.moe_layers())
        self.load_window = torch.zeros(n_moe, cfg.n_routed_experts, dtype=torch.float64)  # since last eval
        self.step, self.tokens, self.window_start = 0, 0, 0
        self.last = {"loss": None, "lm_loss": None, "eval_loss": None, "eval_step": None}
        if self.ckpt:
            self.step, self.tokens = state["step"], state["tokens"]
            self.window_start = state.get("expert_load_since", self.step)
            self.last = {k: state.get(k) for k in self.last}
            self.loader.load_state_dict(state["loader"])
            parallel.load_optimizer_state(self.model, self.opt, tensors["optimizer"], d)
            if tensors["expert_load"].shape == self.load_window.shape:
                self.load_window = tensors["expert_load"].double()
            same = len(tensors["rng_cpu"]) == d.world_size  # else every rank takes rank 0's generator
            torch.set_rng_state(tensors["rng_cpu"][d.rank if same else 0])
            if self.device.type == "cuda" and tensors.get("rng_cuda"):
                torch.cuda.set_rng_state(tensors["rng_cuda"][d.rank if same else 0])
        self.metrics_path = out / "metrics.jsonl"
        if d.is_main:  # drop records past the checkpoint (steps that will be trained again)
            old = plots.read_metrics(self.metrics_path) if self.ckpt else []
            keep = [rec for rec in old if rec["step"] <= self.step]
            self.metrics_path.write_text("".join(json.dumps(rec) + "\n" for rec in keep))
        n_params = sum(p.numel() for p in model.parameters())
        self.say(f"model: preset {r.preset}, {n_params / 1e6:.1f}M parameters; {d.world_size} process(es) on "
                 f"{self.device.type}{' (FSDP2)' if r.fsdp and d.enabled else ' (DDP)' if d.enabled else ''}, "
                 f"{'bf16 autocast' if self.autocast_dtype else 'float32'}")

    def _train_tokenizer(self, vocab: int) -> None:
        start = time.perf_counter()
        stats: dict = {}
        limits = [b for b in (self.r.max_bytes, self.r.tokenizer_max_bytes) if b is not None]
        texts = iter_corpus_texts(self.r.data, min(limits, default=None), self.r.text_field, stats)
        tok = train_tokenizer(texts, vocab, self.out / "tokenizer", show_progress=False)
        self.say(f"tokenizer: trained on {stats['bytes']:,} bytes ({stats['files']} files), vocab {tok.vocab_size}, "
                 f"in {time.perf_counter() - start:.1f}s")

    # ---- one step ------------------------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over the global batch; returns this rank's [loss, lm, expert, device, comm]
        (weighted means over its micro-batches) and its expert load [n_moe_layers, n_experts]."""
        x, y = self.loader.next_batch(batch_size)  # this rank's [B / world_size, T]
        x, y = x.to(self.device), y.to(self.device)
        local = x.shape[0]
        chunks = list(zip(x.split(self.r.micro_batch_size or local), y.split(self.r.micro_batch_size or local)))
        stats = torch.zeros(5, dtype=torch.float64, device=self.device)
        # accumulated on the device: no host sync per micro-batch (the step's one all-reduce brings it back)
        load = torch.zeros(self.load_window.shape, dtype=torch.float64, device=self.device)
        for i, (xc, yc) in enumerate(chunks):
            share = xc.shape[0] / local
            with parallel.grad_sync(self.model, i == len(chunks) - 1):
                with self.autocast():
                    lm = lm_loss(self.model(xc), yc)
                    bal = self.raw.balance_losses()
                    loss = lm + bal["total"]
                (loss * share).backward()
            stats += share * torch.stack([loss, lm, bal["expert"], bal["device"], bal["comm"]]).detach().double()
            if load.numel():
                load += self.raw.expert_load()
        return stats, load

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean cross-entropy over (up to eval_batches global batches of) the held-out blocks."""
        ds, d, r = self.loader.dataset, self.d, self.r
        if ds.n_val == 0:
            return None
        ids = np.arange(ds.n_train, ds.n_blocks)[: r.eval_batches * r.batch_size]
        shares = np.array_split(ids, d.world_size)  # the first share is the largest
        mine, mb = shares[d.rank], r.micro_batch_size or r.batch_size // d.world_size
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.raw.eval()
        # every rank runs the same number of forwards (FSDP's are collectives); a rank out of blocks runs a
        # stand-in block and ignores it, so the result is the same for any world size
        for s in range(0, len(shares[0]), mb):
            part, used = (mine[s:s + mb], 1.0) if len(mine[s:s + mb]) else (ids[:1], 0.0)
            x, y = (t.to(self.device) for t in ds.get_batch(part))
            with self.autocast():
                logits = self.raw(x)
            total[0] += used * F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").double()
            total[1] += used * y.numel()
        self.raw.train()
        parallel.all_reduce_sum(total, d)
        return (total[0] / total[1]).item()

    # ---- the loop ------------------------------------------------------------------------------------------
    def train(self, stop_after: int | None) -> dict:
        r, d = self.r, self.d
        start_step, begun = self.step, time.perf_counter()
        old_handlers = self._catch_signals()
        self.bar = tqdm(total=r.max_steps, initial=self.step, unit="step", disable=not self.progress,
                        dynamic_ncols=True, desc="pretrain")
        stopped_by, last_eval, last_save = "done", None, None
        window = {"n": 0, "stats": torch.zeros(6, dtype=torch.float64), "tokens": 0, "time": 0.0,
                  "load": torch.zeros_like(self.load_window)}
        train_time, run_tokens = 0.0, 0
        try:
            if self.step == 0 and self.ckpt is None:
                last_eval = self._eval_and_record()
            while self.step < r.max_steps:
                t0 = time.perf_counter()
                B = batch_size_at(self.step, r.batch_size, r.batch_size_start, r.batch_ramp_steps, d.world_size)
                lr = lr_at(self.step, r.lr, r.max_steps, r.warmup_steps, r.schedule, r.min_lr_ratio)
                for g in self.opt.param_groups:
                    g["lr"] = lr
                stats, load = self.train_step(B)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip or float("inf"))
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                # one collective for everything the ranks must agree on: losses, stop request, expert load
                flag = torch.tensor([float(self.stop_signal is not None)], dtype=torch.float64, device=self.device)
                packed = parallel.all_reduce_sum(torch.cat([stats, flag, load.flatten().to(self.device)]), d).cpu()
                stats, stop, load = packed[:5] / d.world_size, packed[5].item(), packed[6:].view_as(load)
                loss, gn = stats[0].item(), grad_norm.item()
                if not (math.isfinite(loss) and math.isfinite(gn)):
                    last = latest_checkpoint(self.out)
                    raise TrainingError(
                        f"loss is {loss} (grad norm {gn}) at step {self.step + 1}; stopped before applying it. "
                        f"Last good checkpoint: {last or 'none yet'}. Try a lower --lr or a longer --warmup-steps, "
                        "then --resume.")
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.step += 1
                self.tokens += B * r.seq_len
                dt = time.perf_counter() - t0
                train_time, run_tokens = train_time + dt, run_tokens + B * r.seq_len
                self.last.update(loss=loss, lm_loss=stats[1].item())
                self.load_window += load
                window["n"] += 1
                window["stats"] += torch.cat([stats, torch.tensor([gn], dtype=torch.float64)])
                window["tokens"] += B * r.seq_len
                window["time"] += dt
                window["load"] += load
                self.bar.set_postfix_str(
                    f"loss {loss:.3f} lr {lr:.2e} {run_tokens / train_time:,.0f} tok/s", refresh=False)
                self.bar.update(1)
                if self.step % r.log_every == 0 or self.step == r.max_steps:
                    self._log(window, lr, B)
                if self.step % r.eval_every == 0:
                    last_eval = self._eval_and_record()
                if stop:
                    # a rank without a signal of its own stops because another got one (torchrun: SIGTERM)
                    stopped_by = signal.Signals(self.stop_signal or signal.SIGTERM).name
                    break
                if stop_after is not None and self.step >= stop_after:
                    stopped_by = "stop_after"
                    break
                if self.step % r.save_every == 0:
                    last_save = self._save()
            if self.step > start_step:
                if stopped_by == "done" and last_eval != self.step:
                    last_eval = self._eval_and_record()
                if last_save != self.step:
                    last_save = self._save()
        finally:
            self.bar.close()
            self.bar = None
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        if stopped_by in EXIT_CODES:
            self.say(f"{stopped_by}: saved {latest_checkpoint(self.out)}; continue with --resume")
        return {"step": self.step, "tokens": self.tokens, **self.last,
                "checkpoint": str(latest_checkpoint(self.out)), "stopped_by": stopped_by,
                "tokens_per_s": run_tokens / train_time if train_time else None,
                "elapsed_s": time.perf_counter() - begun, "steps_run": self.step - start_step}

    def _log(self, window: dict, lr: float, batch_size: int) -> None:
        n = window["n"]
        s = (window["stats"] / n).tolist()
        load = window["load"]
        rec = {"step": self.step, "tokens": self.tokens, "loss": s[0], "lm_loss": s[1], "expert_loss": s[2],
               "device_loss": s[3], "comm_loss": s[4], "grad_norm": s[5], "lr": lr, "batch_size": batch_size,
               "tokens_per_s": window["tokens"] / window["time"],
               # per MoE layer: tokens of the busiest expert / the mean (1.0 is a perfect balance)
               "expert_load_max_over_mean": [round(v, 4) for v in
                                             (load.amax(1) / load.mean(1).clamp_min(1e-9)).tolist()]}
        self._record(rec)
        window.update(n=0, stats=torch.zeros_like(window["stats"]), tokens=0, time=0.0, load=torch.zeros_like(load))

    def _eval_and_record(self) -> int:
        loss = self.evaluate()
        if loss is not None:
            self.last.update(eval_loss=loss, eval_step=self.step)
            rec = {"step": self.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
            if self.step > self.window_start and self.load_window.numel():
                rec.update(expert_tokens=self.load_window.round().long().tolist(),
                           expert_tokens_since=self.window_start, first_moe_layer=self.cfg.first_k_dense_replace)
                self.load_window.zero_()
                self.window_start = self.step
            self._record(rec)
            self.say(f"step {self.step}: eval loss {loss:.3f} (perplexity {rec['eval_ppl']:.1f})")
        return self.step

    def _record(self, rec: dict) -> None:
        if self.d.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _save(self) -> int:
        d, r = self.d, self.r
        path = self.out / CKPT_DIR / f"step-{self.step:08d}"
        # collectives first (every rank), then rank 0 writes
        model_state = parallel.full_model_state(self.model, d) if r.fsdp and d.enabled else None
        optim_state = parallel.full_optimizer_state(self.model, self.opt, d)
        rng = parallel.all_gather_object(
            (torch.get_rng_state(), torch.cuda.get_rng_state() if self.device.type == "cuda" else None), d)
        state = {"step": self.step, "tokens": self.tokens, "world_size": d.world_size, "recipe": self.r.to_dict(),
                 "loader": self.loader.state_dict(), "expert_load_since": self.window_start, **self.last}
        tensors = {"optimizer": optim_state, "rng_cpu": [c for c, _ in rng],
                   "rng_cuda": [g for _, g in rng] if self.device.type == "cuda" else [],
                   "expert_load": self.load_window.clone()}

        def write() -> None:
            if model_state is not None:  # FSDP: a plain CPU model from the gathered full state
                with torch.device("meta"):
                    model = DeepseekV2(self.cfg)
                model.load_state_dict(model_state, assign=True)
            else:
                model = self.raw

            def extra(tmp: Path) -> None:
                self.tok.save(tmp)
                torch.save(tensors, tmp / STATE_PT)
                (tmp / STATE_JSON).write_text(json.dumps(state, indent=2, default=_json_default) + "\n")

            previous = latest_checkpoint(self.out)
            try:
                save_checkpoint(model, path, extra=extra)
            except OSError as e:
                kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
                raise TrainingError(f"could not write checkpoint {path}: {e.strerror or e}. Nothing was half-written; "
                                    f"{kept}. Free space (or choose another --out), then --resume.") from e
            for old in checkpoints(self.out)[:-r.keep_last] if r.keep_last else []:
                shutil.rmtree(old, ignore_errors=True)
            self._plot()

        parallel.on_main(d, write)
        return self.step

    def _plot(self) -> None:
        try:
            records = plots.read_metrics(self.metrics_path)
            plots.plot_loss(records, self.out / "loss.png", title=f"{self.r.preset}: {self.out.name}")
            loads = [rec for rec in records if "expert_tokens" in rec]
            if loads:
                plots.plot_expert_load_record(loads[-1], self.out / "expert_load.png")
        except Exception as e:  # a figure is never worth stopping training for
            self.say(f"warning: could not draw plots: {e}")

    # ---- signals -------------------------------------------------------------------------------------------
    def _catch_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal == signum:  # the same signal twice: stop now, without a checkpoint
            raise KeyboardInterrupt
        if self.stop_signal is None:
            self.stop_signal = signum
            self.say(f"{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                     "(send it again to quit at once)")


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# ---- CLI -------------------------------------------------------------------------------------------------------
def add_command(subparsers) -> None:
    """Register `dsv2 pretrain`."""
    p = subparsers.add_parser(
        "pretrain", help="pretrain a DeepSeek-V2 preset on a text corpus (resumable, torchrun-ready)",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, plots)")
    p.add_argument("--config", help="TOML recipe; flags given here override it")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this step; the schedule still "
                                                  "runs to --max-steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    types, helps = field_types(), field_help()
    for f in dataclasses.fields(Recipe):
        if f.name == "model":  # a table: only in the TOML recipe
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f"{helps.get(f.name, '')} (default: {default})".lstrip()
        if types[f.name] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            p.add_argument(flag, type=types[f.name], default=argparse.SUPPRESS, help=text,
                           **({"choices": list(PRESETS)} if f.name == "preset" else {}))
    p.set_defaults(func=_command)


def resolve_recipe(out: str | Path, resume: bool, config: str | None, flags: dict) -> Recipe:
    """Defaults < the checkpoint's recipe (when resuming) < the TOML file < flags."""
    given = {**(load_toml(config) if config else {}), **flags}
    base = {}
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        base = read_trainer_state(ckpt)["recipe"]
        changed = {k: v for k, v in given.items() if base.get(k) != v}
        if changed:
            print(f"resuming with recipe changes: {', '.join(f'{k}={v!r}' for k, v in changed.items())}")
    return Recipe.from_dict({**base, **given}, where=config or "recipe")


def _command(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(Recipe)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    recipe = resolve_recipe(args.out, args.resume, args.config, flags)
    try:
        s = pretrain(recipe, args.out, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        ev = f", eval loss {s['eval_loss']:.3f} (step {s['eval_step']})" if s["eval_loss"] is not None else ""
        tps = f", {s['tokens_per_s']:,.0f} tokens/s" if s["tokens_per_s"] else ""
        loss = f", train loss {s['loss']:.3f}" if s["loss"] is not None else ""
        print(f"step {s['step']}{loss}{ev}{tps}; checkpoint: {s['checkpoint']}")
    return EXIT_CODES.get(s["stopped_by"], 0)


__all__ = ["TrainingError", "add_command", "checkpoints", "latest_checkpoint", "lm_loss", "pretrain",
           "read_trainer_state", "resolve_recipe"]
