"""The training run core, shared by every stage (pretrain, and later SFT, GRPO, YaRN extension).

A stage says what differs (its data, the loss of a micro-batch, its evaluation) by subclassing `Stage`; `train`
does the rest: the run directory, the model (a preset, or `--init-from` a checkpoint's weights, with `[model]`
config overrides), atomic checkpoints, exact resume, SIGINT/SIGTERM, NaN/Inf and full-disk stops, metrics.jsonl,
plots, the progress bar, and the step loop with gradient accumulation, clipping and DDP/FSDP2 (train/parallel.py).

    summary = train(MyStage(), recipe, "runs/x")                 # new run (or resume=True to continue it)

The run directory:
    checkpoints/step-00001000/ config.json + model.safetensors (HF layout) + tokenizer files + trainer state
                               (trainer_state.json + trainer_state.safetensors, see state.py: no pickle)
    metrics.jsonl, loss.png, expert_load.png

A step: the global batch (ramped; data-parallel ranks take contiguous slices) comes from the stage as this
rank's micro-batches; each adds stage.loss(...)["loss"] x its share of the batch to the gradients; clip to
grad_clip; AdamW. Resuming restores weights, optimizer, schedule position, data position (the stage's
state_dict) and RNG, so an interrupted run continues with exactly the losses it would have had.
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

import torch
from tqdm import tqdm

from dsv2.checkpoint import load_config, save_checkpoint
from dsv2.config import ModelConfig
from dsv2.model import DeepseekV2
from dsv2.tokenizer import Tokenizer
from dsv2.train import parallel, plots
from dsv2.train.optim import batch_size_at, build_optimizer, lr_at
from dsv2.train.recipe import MODEL_FIELDS, RunRecipe, add_flags, load_toml
from dsv2.train.state import STATE_JSON, read_trainer_state, read_trainer_tensors, write_trainer_state
from dsv2.utils import int_in

CKPT_DIR = "checkpoints"
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class TrainingError(RuntimeError):
    """Training stopped and cannot go on as asked: the loss diverged, or a checkpoint could not be written."""


class Stage:
    """What a training stage plugs into the run. `Run` calls, in this order:

        tokenizer(run)               only when neither --tokenizer nor --init-from provides one
        setup(run)                   build the data; run.r (recipe), run.tok, run.cfg, run.d are set, the model not
        load_state_dict(state)       when resuming: what state_dict() returned at the checkpoint (data position)
        micro_batches(run, B)        each step: this rank's part of a global batch of B, as [(micro_batch, share)]
                                     with shares summing to 1 (run.micro_split cuts tensors by micro_batch_size)
        loss(run, micro_batch)       {"loss": the scalar to backpropagate, other scalars to log (detached)}; runs
                                     under autocast; use run.model (wrapped) for the forward, run.raw for the rest
        evaluate(run)                {"eval_loss": ..., other metrics} or None; under no_grad, model in eval mode
    Optional, for a stage that trains more than the DeepseekV2 weights (the reward model's head):
        prepare_model(run, model)    after the model is built or loaded (on run.device), before DDP/FSDP and the
                                     optimizer: attach trainable submodules; keep them out of model.state_dict()
                                     (the HF-layout weights) and restore them yourself when run.ckpt is set
        save_extra(run, dir)         write the stage's own files into a checkpoint being written (rank 0)
        plots(run, records)          draw the stage's own figures from metrics.jsonl's records (at each checkpoint)
    Stages may also write their own records into metrics.jsonl with run.record(rec) (rec has "step").
    """

    name = "train"

    def tokenizer(self, run: Run) -> Tokenizer:
        raise ValueError(f"{self.name} needs a tokenizer: pass --tokenizer, or --init-from a checkpoint that has one")

    def setup(self, run: Run) -> None:
        pass

    def micro_batches(self, run: Run, batch_size: int) -> list[tuple[object, float]]:
        raise NotImplementedError

    def loss(self, run: Run, batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, run: Run) -> dict | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def prepare_model(self, run: Run, model: DeepseekV2) -> None:
        pass

    def save_extra(self, run: Run, directory: Path) -> None:
        pass

    def plots(self, run: Run, records: list[dict]) -> None:
        pass


def checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (writes are atomic, so a listed one is whole)."""
    root = Path(out) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_JSON).is_file())


def latest_checkpoint(out: str | Path) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def train(stage: Stage, recipe: RunRecipe, out: str | Path, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> dict:
    """Train `stage` as the recipe says, writing into `out`; returns a summary (step, loss, eval_loss, checkpoint,
    stopped_by: "done" | "stop_after" | "SIGINT" | "SIGTERM", tokens_per_s, ...). Under torchrun every process
    calls this. `stop_after` ends the run (with a checkpoint) after that step without changing the schedule."""
    recipe.validate()
    d = parallel.init_distributed(recipe.ep)
    try:
        run = Run(stage, recipe, Path(out), d, progress)
        run.setup(resume)
        return run.train(stop_after)
    finally:
        parallel.shutdown(d)


class Run:
    def __init__(self, stage: Stage, recipe: RunRecipe, out: Path, d: parallel.Dist, progress: bool = True):
        if recipe.init_from is not None:  # absolute, so a resume from another directory names the same one
            recipe = dataclasses.replace(recipe, init_from=os.path.abspath(recipe.init_from))
        self.stage, self.r, self.out, self.d, self.progress = stage, recipe, Path(out), d, progress and d.is_main
        self.bar: tqdm | None = None
        self.stop_signal: int | None = None

    def say(self, msg: str) -> None:
        if self.d.is_main:
            tqdm.write(msg)  # above the progress bar when there is one

    # ---- setup ---------------------------------------------------------------------------------------------
    def setup(self, resume: bool = False) -> None:
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
        state = read_trainer_state(self.ckpt) if self.ckpt else None
        if self.ckpt:
            self._check_same_model(state["recipe"])
            self.say(f"resuming from {self.ckpt} (step {state['step']})")
        elif r.init_from:
            self.say(f"starting a new run from the weights of {r.init_from}")
        source = self.ckpt or (Path(r.init_from) if r.init_from else None)  # weights (and config) come from here

        self.cfg = load_config(self.ckpt) if self.ckpt else self._model_config()
        # tokenizer: the run's own, the one named, --init-from's, or the stage's (pretrain trains one)
        if self.ckpt:
            self.tok = Tokenizer.load(self.ckpt)
        elif r.tokenizer:
            self.tok = Tokenizer.load(r.tokenizer)
        elif r.init_from and (Path(r.init_from) / "tokenizer.json").is_file():
            self.tok = Tokenizer.load(r.init_from)
        else:
            self.tok = self.stage.tokenizer(self)
        if self.tok.vocab_size > self.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {self.tok.vocab_size} tokens but the model's vocab_size is "
                             f"{self.cfg.vocab_size} (preset {r.preset!r}): use a smaller tokenizer or set "
                             "[model] vocab_size in the recipe")
        self.cfg.bos_token_id, self.cfg.eos_token_id = self.tok.bos_id, self.tok.eos_id
        self.cfg.pad_token_id = self.tok.pad_id
        self.stage.setup(self)

        # model and optimizer
        self.device = d.device
        self.autocast_dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else None,
                               "bfloat16": torch.bfloat16, "float32": None}[r.dtype]
        torch.manual_seed(r.seed)
        # float32 master weights, whatever the checkpoint stores; under --ep each rank holds only its experts
        model = parallel.build_model(self.cfg, d, source, r.init_std)
        if r.freeze_latents:
            if r.fsdp and d.enabled:
                raise ValueError("--freeze-latents is not supported with --fsdp (the weights are sharded); use DDP")
            if source is None:  # a new model: the fixed latents start as an undistorted view of the hidden state
                model.orthogonal_latents_()
        self.stage.prepare_model(self, model)
        if r.compile:
            if self.device.type == "cuda":
                model.compile()
            else:
                self.say("note: --compile is for CUDA; training eagerly on CPU")
        self.raw = model
        self.model = parallel.wrap(model, d, r.fsdp)
        self.opt = build_optimizer(self.model, r.lr, r.weight_decay, (r.beta1, r.beta2))
        n_moe = len(model.moe_layers())
        self.load_window = torch.zeros(n_moe, self.cfg.n_routed_experts, dtype=torch.float64)  # since last eval
        self.step, self.tokens, self.window_start = 0, 0, 0
        self.last: dict = {"loss": None, "eval_loss": None, "eval_step": None}
        if self.ckpt:
            self._restore(state)
        self.metrics_path = out / "metrics.jsonl"
        if d.is_main:  # drop records past the checkpoint (steps that will be trained again)
            old = plots.read_metrics(self.metrics_path) if self.ckpt else []
            keep = [rec for rec in old if rec["step"] <= self.step]
            self.metrics_path.write_text("".join(json.dumps(rec) + "\n" for rec in keep))
        n_params = sum(p.numel() for p in model.parameters())
        what = f"from {r.init_from}" if r.init_from else f"preset {r.preset}"
        n_params += sum(p.numel() for p in parallel.expert_params(model).values()) * (d.ep - 1)  # other ranks'
        how = " (FSDP2)" if r.fsdp and d.enabled else " (DDP)" if d.enabled and d.ep == 1 else ""
        how += f" (experts split over {d.ep}: --ep)" if d.ep > 1 else ""
        self.say(f"model: {what}, {n_params / 1e6:.1f}M parameters; {d.world_size} process(es) on "
                 f"{self.device.type}{how}, "
                 f"{'bf16 autocast' if self.autocast_dtype else 'float32'}")

    def _model_config(self) -> ModelConfig:
        """A new run's model: the preset, or --init-from's config.json, with the recipe's [model] overrides."""
        r = self.r
        try:
            if r.init_from:
                return dataclasses.replace(load_config(r.init_from), **r.model)
            return ModelConfig.from_preset(r.preset, **r.model)
        except TypeError as e:  # an unknown field name
            raise ValueError(f"[model] overrides {r.model}: {e}") from None

    def _check_same_model(self, saved: dict) -> None:
        """A resumed run keeps its model: a changed preset, --init-from or [model] override is an error."""
        changed = []
        for k in MODEL_FIELDS:
            old, new = saved.get(k), getattr(self.r, k)
            if k == "model":
                old = old or {}
                changed += [f"model.{f}: {old.get(f)!r} -> {new.get(f)!r}" for f in sorted({*old, *new})
                            if old.get(f) != new.get(f)]
            elif old != new:
                changed.append(f"{k}: {old!r} -> {new!r}")
        if changed:
            raise ValueError(f"cannot resume {self.ckpt} with changed model settings ({'; '.join(changed)}). A run "
                             f"keeps its model; to change it, start a new run with --init-from {self.ckpt}")

    def _restore(self, state: dict) -> None:
        d = self.d
        optim, rng_cpu, rng_cuda, tensors = read_trainer_tensors(self.ckpt)
        self.step, self.tokens = state["step"], state["tokens"]
        self.window_start = state["expert_load_since"]
        self.last = dict(state["last"])
        self.stage.load_state_dict(state["data"])
        parallel.load_optimizer_state(self.model, self.opt, optim, d)
        if tensors["expert_load"].shape == self.load_window.shape:
            self.load_window = tensors["expert_load"].double()
        rank = d.rank if len(rng_cpu) == d.world_size else 0  # else every rank takes rank 0's generator
        torch.set_rng_state(rng_cpu[rank])
        if self.device.type == "cuda" and rng_cuda:
            torch.cuda.set_rng_state(rng_cuda[rank])

    # ---- one step ------------------------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def micro_split(self, *tensors: torch.Tensor) -> list[tuple[tuple[torch.Tensor, ...], float]]:
        """This rank's batch tensors (same first dim) in micro-batches of micro_batch_size, each with its share."""
        local = tensors[0].shape[0]
        parts = zip(*(t.to(self.device).split(self.r.micro_batch_size or local) for t in tensors))
        return [(p, p[0].shape[0] / local) for p in parts]

    def train_step(self, batch_size: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Forward and backward over the global batch; returns the stage's stat names, this rank's values (means
        over its micro-batches, weighted by share) and its expert load [n_moe_layers, n_experts]."""
        micro = self.stage.micro_batches(self, batch_size)
        sums: dict[str, torch.Tensor] = {}
        # accumulated on the device: no host sync per micro-batch (the step's one all-reduce brings it back)
        load = torch.zeros(self.load_window.shape, dtype=torch.float64, device=self.device)
        for i, (batch, share) in enumerate(micro):
            with parallel.grad_sync(self.model, i == len(micro) - 1):
                with self.autocast():
                    out = self.stage.loss(self, batch)
                (out["loss"] * share).backward()
            for k, v in out.items():
                sums[k] = sums.get(k, 0) + share * v.detach().double()
            if load.numel():
                load += self.raw.expert_load()
        return list(sums), torch.stack(list(sums.values())), load

    def _freeze_latent_grads(self) -> None:
        """No update for the latent down-projections this step (`freeze_latents`): their gradient rows are zeroed
        before clipping, so Adam's moments stay at zero for them. AdamW's decoupled weight decay still scales the
        rows by (1 - lr * wd) per step, which the RMSNorm after each latent undoes."""
        with torch.no_grad():
            for w, rows in self.raw.latent_down_weights():
                if w.grad is not None:
                    w.grad[:rows] = 0

    # ---- the loop ------------------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> dict:
        r, d = self.r, self.d
        start_step, begun = self.step, time.perf_counter()
        old_handlers = self._catch_signals()
        self.bar = tqdm(total=r.max_steps, initial=self.step, unit="step", disable=not self.progress,
                        dynamic_ncols=True, desc=self.stage.name)
        stopped_by, last_eval, last_save = "done", None, None
        window = {"n": 0, "sums": {}, "tokens": 0, "time": 0.0, "load": torch.zeros_like(self.load_window)}
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
                names, stats, load = self.train_step(B)
                if self.step < r.freeze_latents:
                    self._freeze_latent_grads()
                grad_norm = parallel.clip_grad_norm(self.model, r.grad_clip or float("inf"))
                # one collective for everything the ranks must agree on: losses, stop request, expert load
                flag = torch.tensor([float(self.stop_signal is not None)], dtype=torch.float64, device=self.device)
                packed = parallel.all_reduce_sum(torch.cat([stats, flag, load.flatten().to(self.device)]), d).cpu()
                n = len(names)
                values = dict(zip(names, (packed[:n] / d.world_size).tolist()))
                stop, load = packed[n].item(), packed[n + 1:].view_as(load)
                loss, gn = values["loss"], grad_norm.item()
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
                self.last.update(values)
                self.load_window += load
                window["n"] += 1
                for k, v in {**values, "grad_norm": gn}.items():
                    window["sums"][k] = window["sums"].get(k, 0.0) + v
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
        n, load = window["n"], window["load"]
        rec = {"step": self.step, "tokens": self.tokens, **{k: v / n for k, v in window["sums"].items()}, "lr": lr,
               "batch_size": batch_size, "tokens_per_s": window["tokens"] / window["time"]}
        if load.numel():  # per MoE layer: tokens of the busiest expert / the mean (1.0 is a perfect balance)
            rec["expert_load_max_over_mean"] = [round(v, 4) for v in
                                                (load.amax(1) / load.mean(1).clamp_min(1e-9)).tolist()]
        self.record(rec)
        window.update(n=0, sums={}, tokens=0, time=0.0, load=torch.zeros_like(load))

    def _eval_and_record(self) -> int:
        self.raw.eval()
        with torch.no_grad():
            res = self.stage.evaluate(self)
        self.raw.train()
        if res:
            self.last.update(eval_loss=res.get("eval_loss"), eval_step=self.step)
            rec = {"step": self.step, **res}
            if self.step > self.window_start and self.load_window.numel():
                rec.update(expert_tokens=self.load_window.round().long().tolist(),
                           expert_tokens_since=self.window_start, first_moe_layer=self.cfg.first_k_dense_replace)
                self.load_window.zero_()
                self.window_start = self.step
            self.record(rec)
            shown = [f"eval loss {res['eval_loss']:.3f}" if "eval_loss" in res else ""]
            shown += [f"(perplexity {res['eval_ppl']:.1f})" if "eval_ppl" in res else ""]
            shown += [f"{k} {v:.4g}" for k, v in res.items() if k not in ("eval_loss", "eval_ppl")]
            self.say(f"step {self.step}: " + " ".join(s for s in shown if s))
        return self.step

    def record(self, rec: dict) -> None:
        """Append a record to metrics.jsonl (main process); the run's own and a stage's extra ones."""
        if self.d.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _save(self) -> int:
        d, r = self.d, self.r
        path = self.out / CKPT_DIR / f"step-{self.step:08d}"
        # collectives first (every rank), then rank 0 writes
        model_state = parallel.full_model_state(self.model, d) if r.fsdp and d.enabled and d.ep == 1 else None
        finish_shards = parallel.write_model_shards(self.raw, path, d)  # --ep: each rank writes its experts now
        optim_state = parallel.full_optimizer_state(self.model, self.opt, d)
        rng = parallel.all_gather_object(
            (torch.get_rng_state(), torch.cuda.get_rng_state() if self.device.type == "cuda" else None), d)
        state = {"step": self.step, "tokens": self.tokens, "world_size": d.world_size, "stage": self.stage.name,
                 "recipe": r.to_dict(), "data": self.stage.state_dict(), "expert_load_since": self.window_start,
                 "last": self.last}

        def write() -> None:
            if model_state is not None:  # FSDP: a plain CPU model from the gathered full state
                with torch.device("meta"):
                    model = DeepseekV2(self.cfg)
                model.load_state_dict(model_state, assign=True)
            else:
                model = self.raw

            def extra(tmp: Path) -> None:
                self.tok.save(tmp)
                self.stage.save_extra(self, tmp)
                write_trainer_state(tmp, state, optim_state, rng, {"expert_load": self.load_window})

            previous = latest_checkpoint(self.out)
            try:
                if finish_shards is not None:
                    finish_shards(extra)
                else:
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
            plots.plot_loss(records, self.out / "loss.png", title=f"{self.stage.name}: {self.out.name}")
            loads = [rec for rec in records if "expert_tokens" in rec]
            if loads:
                plots.plot_expert_load_record(loads[-1], self.out / "expert_load.png")
            self.stage.plots(self, records)
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


# ---- the command line every stage shares ------------------------------------------------------------------------
def add_run_arguments(p: argparse.ArgumentParser, recipe_cls: type, choices: dict[str, list] | None = None) -> None:
    """--out, --config, --resume, --stop-after, --no-progress, and one flag per recipe field."""
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, plots)")
    p.add_argument("--config", help="TOML recipe; flags given here override it")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--stop-after", type=int_in(1), help="stop (with a checkpoint) after this step; the schedule still "
                                                  "runs to --max-steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_flags(p, recipe_cls, choices)


def resolve_recipe(recipe_cls: type, out: str | Path, resume: bool, config: str | None, flags: dict) -> RunRecipe:
    """Defaults < the checkpoint's recipe (when resuming) < the TOML file < flags. Changed model settings are
    left for the run to refuse (naming them); other changes are printed."""
    given = {**(load_toml(config) if config else {}), **flags}
    base = {}
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        base = read_trainer_state(ckpt)["recipe"]
        changed = {k: v for k, v in given.items() if base.get(k) != v and k not in MODEL_FIELDS}
        if changed:
            print(f"resuming with recipe changes: {', '.join(f'{k}={v!r}' for k, v in changed.items())}")
    return recipe_cls.from_dict({**base, **given}, where=config or "recipe")


def run_command(args: argparse.Namespace, recipe_cls: type, train_fn) -> int:
    """The body of a stage's verb: resolve the recipe, `train_fn(recipe, out, resume=, stop_after=, progress=)`,
    print the summary; exit code 0, 1 (TrainingError), 130 (SIGINT) or 143 (SIGTERM)."""
    names = {f.name for f in dataclasses.fields(recipe_cls)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    if args.resume and not Path(args.out).exists():  # a mistyped --out would otherwise start a whole default run
        raise ValueError(f"--resume: {args.out} does not exist, so there is no run to continue; check --out, or drop "
                         "--resume to start a new run there")
    recipe = resolve_recipe(recipe_cls, args.out, args.resume, args.config, flags)
    try:
        s = train_fn(recipe, args.out, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        ev = f", eval loss {s['eval_loss']:.3f} (step {s['eval_step']})" if s["eval_loss"] is not None else ""
        tps = f", {s['tokens_per_s']:,.0f} tokens/s" if s["tokens_per_s"] else ""
        loss = f", train loss {s['loss']:.3f}" if s["loss"] is not None else ""
        print(f"step {s['step']}{loss}{ev}{tps}; checkpoint: {s['checkpoint']}")
    return EXIT_CODES.get(s["stopped_by"], 0)


__all__ = ["CKPT_DIR", "EXIT_CODES", "Run", "Stage", "TrainingError", "add_run_arguments", "checkpoints",
           "latest_checkpoint", "read_trainer_state", "resolve_recipe", "run_command", "train"]
