"""Context extension: `dsv2 extend` switches a checkpoint's RoPE to YaRN and trains it on longer sequences.

    dsv2 extend --init-from runs/demo/checkpoints/step-00000240 --factor 8 --seq-len 2048 --steps 60 --out runs/ext
    dsv2 extend --init-from CKPT --rope pi --factor 8 --seq-len 2048 --steps 60 --out runs/ext-pi    # plain PI
    dsv2 extend --init-from CKPT --rope none --seq-len 2048 --steps 60 --out runs/ext-none   # no scaling at all
    dsv2 extend --out runs/ext --resume                                                    # continue the run

As the paper (section 3.3, YaRN for 4K -> 128K): the rope_scaling block gets original_max_position_embeddings =
the length the checkpoint was trained at (its trainer state's seq_len, else --original-max, else an existing
block's value, else its max_position_embeddings), factor S, beta_fast 32, beta_slow 1 and mscale = mscale_all_dim
(0.707 in the paper; its softmax correction is mscale(S, mscale_all_dim)^2, see model/rope.py), and
max_position_embeddings = original x S. `--rope pi` writes {"type": "linear", "factor": S} (every position / S);
`--rope none` keeps the frequencies and only trains longer. The config.json of every checkpoint carries the
block in the form transformers' DeepseekV2Config and vLLM read.

Training is pretraining's stage (train/pretrain.py: packed blocks of a corpus, LM + balance losses) at the new
--seq-len, through the run core (train/run.py: checkpoints, exact resume, metrics.jsonl, plots), plus, with
--kv-fraction > 0, that share of each batch drawn from a synthetic key-value retrieval corpus (data.py
kv_retrieval_block: corpus text with needles, then their questions and answers) so that a small model can learn to
retrieve across the window at all, and with --copy-fraction > 0, that share from synthetic copy sequences (data.py
copy_block: random spans, each repeated), the induction pattern retrieval is built on and a briefly
trained small model lacks. Deviation from the paper: it extends with plain long documents only.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsv2.checkpoint import load_config
from dsv2.config import PRESETS
from dsv2.data import kv_retrieval_block
from dsv2.train.pretrain import Pretrain, synthetic_part
from dsv2.train.recipe import Recipe, _need
from dsv2.train.run import Run, add_run_arguments, read_trainer_state, run_command, train
from dsv2.train.state import STATE_JSON


@dataclass
class ExtendRecipe(Recipe):
    """Pretraining's fields (corpus, batches, optimizer) plus the RoPE scaling and the retrieval mixture."""
    rope: str = "yarn"  # yarn, pi (linear position interpolation) or none (no scaling, only longer training)
    factor: float = 8.0  # context scale S: max_position_embeddings = original length x S
    original_max: int = 0  # length the checkpoint was trained at; 0: read it from the checkpoint
    beta_fast: float = 32.0  # YaRN: pairs rotating more than this often over the original length keep their RoPE
    beta_slow: float = 1.0  # YaRN: pairs rotating less than this often are fully interpolated
    mscale: float = 0.707  # YaRN: cos/sin scale mscale(S, mscale) / mscale(S, mscale_all_dim)
    mscale_all_dim: float = 0.707  # YaRN: softmax scale times mscale(S, mscale_all_dim)^2
    kv_fraction: float = 0.0  # share of each batch from the synthetic key-value retrieval corpus (0: none)
    kv_max_needles: int = 4  # needles per retrieval sequence (1 to this many)

    def validate(self) -> None:
        super().validate()
        _need(self.rope in ("yarn", "pi", "none"), f"rope must be yarn, pi or none, got {self.rope!r}")
        _need(self.factor >= 1, f"factor must be >= 1, got {self.factor}")
        _need(self.original_max >= 0, f"original_max must be >= 0, got {self.original_max}")
        _need(0 <= self.kv_fraction <= 1, f"kv_fraction must be in [0, 1], got {self.kv_fraction}")
        _need(self.kv_fraction + self.copy_fraction <= 1,
              f"kv_fraction + copy_fraction must be at most 1, got {self.kv_fraction} + {self.copy_fraction}")
        _need(self.kv_max_needles >= 1, f"kv_max_needles must be >= 1, got {self.kv_max_needles}")


def trained_length(ckpt: str | Path) -> int:
    """The sequence length a checkpoint was trained at: its trainer state's seq_len, else the original length of
    its rope_scaling block, else its max_position_embeddings."""
    ckpt = Path(ckpt)
    if (ckpt / STATE_JSON).is_file():
        return int(read_trainer_state(ckpt)["recipe"]["seq_len"])
    cfg = load_config(ckpt)
    rs = cfg.rope_scaling or {}
    return int(rs.get("original_max_position_embeddings") or cfg.max_position_embeddings)


def rope_overrides(r: ExtendRecipe, original: int) -> dict:
    """The ModelConfig fields the extension sets: rope_scaling and max_position_embeddings."""
    if r.rope == "none":
        return {"rope_scaling": None, "max_position_embeddings": max(original, r.seq_len)}
    if r.rope == "pi":
        scaling = {"type": "linear", "factor": float(r.factor)}
    else:
        scaling = {"type": "yarn", "factor": float(r.factor), "original_max_position_embeddings": original,
                   "beta_fast": float(r.beta_fast), "beta_slow": float(r.beta_slow), "mscale": float(r.mscale),
                   "mscale_all_dim": float(r.mscale_all_dim)}
    return {"rope_scaling": scaling, "max_position_embeddings": int(round(original * r.factor))}


class Extend(Pretrain):
    """Pretraining's packed corpus at the long length, a `kv_fraction` share of each batch replaced by retrieval
    sequences. The data position is the corpus loader's plus the number of retrieval sequences drawn so far
    (sequence i is made from the generator seeded (seed, i), so a resumed run draws the same ones)."""

    name = "extend"

    def setup(self, run: Run) -> None:
        super().setup(run)
        self.kv_drawn = 0
        ds = self.loader.dataset
        self.kv_tokens = ds.n_train * (ds.seq_len + 1)  # retrieval filler comes from the training blocks only

    def batch_parts(self, run: Run, batch_size: int, reserved: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Pretraining's parts (corpus blocks, copy sequences), then a kv_fraction share of retrieval sequences."""
        r, ws = run.r, run.d.world_size
        n_kv = int(round(batch_size * r.kv_fraction / ws)) * ws  # divisible by the number of processes
        parts = super().batch_parts(run, batch_size, reserved=reserved + n_kv)
        if n_kv:
            parts.append(synthetic_part(run, n_kv, self.kv_drawn, lambda i: kv_retrieval_block(
                self.loader.dataset.tokens, self.kv_tokens, run.tok, r.seq_len + 1, np.random.default_rng((r.seed, i)),
                r.kv_max_needles)))
            self.kv_drawn += n_kv
        return parts

    def state_dict(self) -> dict:
        return {**super().state_dict(), "kv_drawn": self.kv_drawn}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.kv_drawn = state.pop("kv_drawn", 0)
        super().load_state_dict(state)


def extend(recipe: ExtendRecipe, out: str | Path, resume: bool = False, stop_after: int | None = None,
           progress: bool = True) -> dict:
    """Extend recipe.init_from's context as the recipe says, writing a run into `out` (see the module docstring);
    returns the run core's summary (run.train)."""
    if not recipe.init_from:
        raise ValueError("extend needs --init-from CKPT: the checkpoint whose context to extend")
    init = os.path.abspath(recipe.init_from)
    original = recipe.original_max or trained_length(init)
    if original >= recipe.seq_len and recipe.rope != "none":
        print(f"note: --seq-len {recipe.seq_len} is not longer than the trained length {original}")
    model = {**recipe.model, **rope_overrides(recipe, original)}
    recipe = dataclasses.replace(recipe, init_from=init, model=model, original_max=original,
                                 data=None if recipe.data is None else os.path.abspath(recipe.data))
    return train(Extend(), recipe, out, resume=resume, stop_after=stop_after, progress=progress)


# ---- CLI -------------------------------------------------------------------------------------------------------
def add_command(subparsers) -> None:
    """Register `dsv2 extend`."""
    p = subparsers.add_parser(
        "extend", help="extend a checkpoint's context with YaRN (or PI) and train it on longer sequences",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, ExtendRecipe, choices={"preset": list(PRESETS), "rope": ["yarn", "pi", "none"]})
    p.add_argument("--steps", type=int, dest="max_steps", default=argparse.SUPPRESS, help="same as --max-steps")
    p.set_defaults(func=lambda args: run_command(args, ExtendRecipe, extend))


__all__ = ["Extend", "ExtendRecipe", "add_command", "extend", "rope_overrides", "trained_length"]
