"""Pretraining: `dsv2 pretrain` trains a DeepSeek-V2 preset on a text corpus with the paper's recipe.

    dsv2 pretrain --preset small --out runs/small                  # the Python stdlib sources as the corpus
    dsv2 pretrain --preset small --data corpus/ --out runs/x --max-steps 2000 --config recipe.toml
    dsv2 pretrain --out runs/x --resume                            # continue from the latest checkpoint
    dsv2 pretrain --init-from runs/x/checkpoints/step-00002000 --data more/ --out runs/y   # new run, those weights
    torchrun --nproc-per-node 2 -m dsv2.cli pretrain ... [--fsdp]  # data parallel (gloo on CPU, nccl on CUDA)
    torchrun --nproc-per-node 4 -m dsv2.cli pretrain ... --ep 2    # experts split over 2 ranks (expert parallel)

The run directory holds everything (the run core's layout, see train/run.py), plus:
    tokenizer/                 the tokenizer trained on the corpus (unless --tokenizer or --init-from gives one)
    tokens.bin, tokens.bin.json   the corpus tokenized once (memory-mapped; reused while corpus and tokenizer match)

A micro-batch's loss is next-token cross-entropy plus the MoE balance losses (expert, device, communication);
the held-out blocks give eval_loss and eval_ppl. The data position is the BatchLoader's (epoch, position).

`--copy-fraction F` replaces that share of every batch by synthetic copy sequences (data.py copy_block: random
spans of `--copy-vocab` tokens, or with `--copy-source text` spans of the training corpus, each written
`--copy-repeats` times), the induction pattern behind in-context copying and retrieval, which a small model trained
briefly on text may not form (`dsv2 eval niah` checks it).
Sequence i is drawn from the generator seeded (seed, i, 1), and the number drawn is part of the data position, so
resume is exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dsv2.config import PRESETS
from dsv2.data import BatchLoader, PackedDataset, build_token_file, copy_block, copy_palette, iter_corpus_texts
from dsv2.tokenizer import Tokenizer, train_tokenizer
from dsv2.train import parallel
from dsv2.train.recipe import Recipe
from dsv2.train.run import (Run, Stage, TrainingError, add_run_arguments, checkpoints, latest_checkpoint,
                            read_trainer_state, run_command, train)
from dsv2.train.run import resolve_recipe as _resolve_recipe


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits [B, T, V], targets [B, T]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class Pretrain(Stage):
    """Packed blocks of a tokenized corpus; loss = LM + balance losses; eval on the held-out blocks."""

    name = "pretrain"

    def tokenizer(self, run: Run) -> Tokenizer:
        """Train one on the corpus at the model's vocab size (rank 0), saved in the run directory."""
        parallel.on_main(run.d, lambda: self._train_tokenizer(run))
        return Tokenizer.load(run.out / "tokenizer")

    def _train_tokenizer(self, run: Run) -> None:
        r, start, stats = run.r, time.perf_counter(), {}
        limits = [b for b in (r.max_bytes, r.tokenizer_max_bytes) if b is not None]
        texts = iter_corpus_texts(r.data, min(limits, default=None), r.text_field, stats)
        tok = train_tokenizer(texts, run.cfg.vocab_size, run.out / "tokenizer", show_progress=False)
        run.say(f"tokenizer: trained on {stats['bytes']:,} bytes ({stats['files']} files), vocab {tok.vocab_size}, "
                f"in {time.perf_counter() - start:.1f}s")

    def setup(self, run: Run) -> None:
        r, d = run.r, run.d
        if r.copy_fraction:
            copy_palette(run.tok, r.copy_vocab)  # a vocabulary too large for the tokenizer fails here, not mid-run
        stats = parallel.on_main(d, lambda: build_token_file(  # tokenized once, by rank 0
            r.data, run.tok, run.out / "tokens.bin", max_bytes=r.max_bytes, progress=run.progress,
            text_field=r.text_field))
        ds = PackedDataset(run.out / "tokens.bin", r.seq_len, r.val_fraction)
        if stats:
            run.say(f"data: {stats['files']} files, {stats['bytes']:,} bytes, {stats['documents']:,} documents -> "
                    f"{stats['tokens']:,} tokens{' (cached)' if stats['reused'] else ''}; {ds.n_train} train / "
                    f"{ds.n_val} held-out blocks of {r.seq_len} tokens")
        self.loader = BatchLoader(ds, seed=r.seed, rank=d.rank, world_size=d.world_size)
        self.copy_drawn = 0

    def micro_batches(self, run: Run, batch_size: int):
        return run.micro_split(*(torch.cat(t) for t in zip(*self.batch_parts(run, batch_size))))

    def batch_parts(self, run: Run, batch_size: int, reserved: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of a global batch of `batch_size` sequences, as (inputs, targets) parts: corpus blocks,
        then a copy_fraction share of copy sequences; `reserved` sequences are left for the caller to add."""
        r, ws = run.r, run.d.world_size
        n_copy = min(int(round(batch_size * r.copy_fraction / ws)) * ws, batch_size - reserved)
        parts = []
        if batch_size - reserved - n_copy > 0:
            parts.append(self.loader.next_batch(batch_size - reserved - n_copy))  # [B' / world_size, T] x 2
        if n_copy:
            ds, text = self.loader.dataset, r.copy_source != "random"
            parts.append(synthetic_part(run, n_copy, self.copy_drawn, lambda i: copy_block(
                run.tok, r.seq_len + 1, np.random.default_rng((r.seed, i, 1)), repeats=r.copy_repeats,
                vocab=r.copy_vocab, text=ds.tokens if text else None, n_text=ds.n_train * (ds.seq_len + 1),
                mixed=r.copy_source == "mixed")))
            self.copy_drawn += n_copy
        return parts

    def loss(self, run: Run, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        lm = lm_loss(run.model(x), y)
        bal = run.raw.balance_losses()
        return {"loss": lm + bal["total"], "lm_loss": lm, "expert_loss": bal["expert"],
                "device_loss": bal["device"], "comm_loss": bal["comm"]}

    def evaluate(self, run: Run) -> dict | None:
        """Mean cross-entropy over (up to eval_batches global batches of) the held-out blocks."""
        ds, d, r = self.loader.dataset, run.d, run.r
        if ds.n_val == 0:
            return None
        ids = np.arange(ds.n_train, ds.n_blocks)[: r.eval_batches * r.batch_size]
        shares = np.array_split(ids, d.world_size)  # the first share is the largest
        mine, mb = shares[d.rank], r.micro_batch_size or r.batch_size // d.world_size
        total = torch.zeros(2, dtype=torch.float64, device=run.device)
        # every rank runs the same number of forwards (FSDP's are collectives); a rank out of blocks runs a
        # stand-in block and ignores it, so the result is the same for any world size
        for s in range(0, len(shares[0]), mb):
            part, used = (mine[s:s + mb], 1.0) if len(mine[s:s + mb]) else (ids[:1], 0.0)
            x, y = (t.to(run.device) for t in ds.get_batch(part))
            with run.autocast():
                logits = run.raw(x)
            total[0] += used * F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").double()
            total[1] += used * y.numel()
        parallel.all_reduce_sum(total, d)
        loss = (total[0] / total[1]).item()
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def state_dict(self) -> dict:
        return {**self.loader.state_dict(), "copy_drawn": self.copy_drawn}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.copy_drawn = state.pop("copy_drawn", 0)
        self.loader.load_state_dict(state)


def synthetic_part(run: Run, n: int, drawn: int, make) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of n synthetic sequences (n divisible by the world size), numbered from `drawn` across
    all ranks: make(i) -> seq_len + 1 token ids for sequence i. Returns (inputs, targets)."""
    local = n // run.d.world_size
    first = drawn + run.d.rank * local
    x = torch.from_numpy(np.stack([make(i) for i in range(first, first + local)]))
    return x[:, :-1], x[:, 1:]


def pretrain(recipe: Recipe, out: str | Path, resume: bool = False, stop_after: int | None = None,
             progress: bool = True) -> dict:
    """Pretrain as the recipe says, writing into `out`; returns the run core's summary (see run.train)."""
    if recipe.data is not None:  # absolute, so a resume from another directory finds the corpus
        recipe = dataclasses.replace(recipe, data=os.path.abspath(recipe.data))
    return train(Pretrain(), recipe, out, resume=resume, stop_after=stop_after, progress=progress)


def resolve_recipe(out: str | Path, resume: bool, config: str | None, flags: dict) -> Recipe:
    """Defaults < the checkpoint's recipe (when resuming) < the TOML file < flags."""
    return _resolve_recipe(Recipe, out, resume, config, flags)


# ---- CLI -------------------------------------------------------------------------------------------------------
def add_command(subparsers) -> None:
    """Register `dsv2 pretrain`."""
    p = subparsers.add_parser(
        "pretrain", help="pretrain a DeepSeek-V2 preset on a text corpus (resumable, torchrun-ready)",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, Recipe, choices={"preset": list(PRESETS)})
    p.set_defaults(func=lambda args: run_command(args, Recipe, pretrain))


__all__ = ["Pretrain", "TrainingError", "add_command", "checkpoints", "latest_checkpoint", "lm_loss", "pretrain",
           "read_trainer_state", "resolve_recipe"]
