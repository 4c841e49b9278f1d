"""Training recipes: flat dataclasses for how to train (the model's shape is the preset's business).

`RunRecipe` holds what every stage shares (model source, batches, optimizer, schedule, hardware, bookkeeping);
a stage's recipe subclasses it with its own fields (`Recipe`, pretraining's, adds the corpus). Every field is
also a flag (`max_steps` -> `--max-steps`) and a key of a TOML recipe:

    # recipe.toml
    preset = "small"
    max_steps = 2000
    lr = 3e-3
    schedule = "cosine"
    [model]                 # optional: ModelConfig overrides of the preset (or of the --init-from checkpoint)
    num_hidden_layers = 8
    rope_scaling = {type = "yarn", factor = 8, original_max_position_embeddings = 256}

Precedence: the dataclass defaults < the TOML file < flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dsv2.data import COPY_ALPHABET, COPY_REPEATS, COPY_SOURCES, COPY_VOCAB
from dsv2.train.optim import SCHEDULES

# what makes the model; a resumed run must not change these (the optimizer state and weights belong to it, and
# its checkpoints carry their tokenizer)
MODEL_FIELDS = ("preset", "init_from", "model", "tokenizer")


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"invalid recipe: {msg}")


@dataclass
class RunRecipe:
    # the model
    preset: str = "small"
    init_from: str | None = None  # start a new run (step 0, fresh optimizer) from this checkpoint's weights
    model: dict = field(default_factory=dict)  # ModelConfig overrides of the preset or of --init-from's config
    tokenizer: str | None = None  # tokenizer dir; None: --init-from's, else the stage's own (pretrain trains one)
    # batches
    seq_len: int = 256
    batch_size: int = 32  # global sequences per optimizer step
    micro_batch_size: int = 0  # sequences per forward on one process (gradient accumulation); 0: all at once
    batch_size_start: int = 0  # batch-size ramp: start here ...
    batch_ramp_steps: int = 0  # ... and reach batch_size after this many steps
    # optimizer and schedule
    max_steps: int = 1000
    lr: float = 3e-3
    schedule: str = "step"  # "step" (the paper's), "cosine" or "constant" (after the warmup)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine floor
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: no clipping (the norm is still logged)
    init_std: float | None = None  # None: the preset's initializer_range
    freeze_latents: int = 0  # the q/kv latent down-projections (W_DQ, W_DKV) get no gradient for this many first steps; a new model draws them orthogonal. With a latent as wide as the hidden state, copying from context forms far sooner (docs/ablations.md)
    seed: int = 0
    # hardware
    dtype: str = "auto"  # auto: bfloat16 autocast on CUDA, float32 on CPU; or float32 / bfloat16
    compile: bool = False  # torch.compile the model (CUDA)
    fsdp: bool = False  # under torchrun: FSDP2 fully_shard instead of DDP
    ep: int = 1  # under torchrun: split the routed experts over this many processes (expert parallel)
    # bookkeeping
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20  # at most this many global batches of held-out data per evaluation
    save_every: int = 500
    keep_last: int = 2  # checkpoints kept (0: all)

    def validate(self) -> None:
        for name in ("seq_len", "batch_size", "max_steps", "log_every", "eval_every", "eval_batches", "save_every"):
            _need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name in ("micro_batch_size", "batch_size_start", "batch_ramp_steps", "warmup_steps", "keep_last",
                     "freeze_latents"):
            _need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _need(self.lr > 0, f"lr must be positive, got {self.lr}")
        _need(self.ep >= 1, f"ep must be >= 1, got {self.ep}")
        _need(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _need(self.dtype in ("auto", "float32", "bfloat16"),
              f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        _need(self.batch_size_start <= self.batch_size, "batch_size_start must be <= batch_size")
        _need(isinstance(self.model, dict), f"model must be a table of ModelConfig overrides, got {self.model!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "recipe"):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        r = cls(**d)
        r.validate()
        return r


@dataclass
class Recipe(RunRecipe):
    """Pretraining: the run's fields plus the corpus."""
    data: str | None = None  # file, directory or glob; None: the Python stdlib sources
    text_field: str = "text"  # field (.jsonl) or column (.parquet) holding the text
    max_bytes: int | None = None  # use at most this much text
    tokenizer_max_bytes: int | None = 50_000_000  # text used to train a tokenizer when none is given
    val_fraction: float = 0.005
    copy_fraction: float = 0.0  # share of each batch from synthetic copy sequences (data.copy_block; 0: none)
    copy_repeats: int = COPY_REPEATS  # times each random span is written in a copy sequence (at least 2)
    copy_vocab: int = COPY_VOCAB  # distinct tokens copy sequences draw from (letters, digits, then other tokens)
    copy_source: str = "random"  # "random" (--copy-vocab spans), "text" (corpus windows), "mixed" (the first amid text)

    def validate(self) -> None:
        super().validate()
        _need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        _need(0 <= self.copy_fraction <= 1, f"copy_fraction must be in [0, 1], got {self.copy_fraction}")
        _need(self.copy_repeats >= 2, f"copy_repeats must be at least 2, got {self.copy_repeats}")
        _need(self.copy_vocab >= len(COPY_ALPHABET),
              f"copy_vocab must be at least {len(COPY_ALPHABET)} (the letters and digits), got {self.copy_vocab}")
        _need(self.copy_source in COPY_SOURCES,
              f"copy_source must be one of {', '.join(COPY_SOURCES)}, got {self.copy_source!r}")


def load_toml(path: str | Path) -> dict:
    """The recipe keys of a TOML file (unchecked until Recipe.from_dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file not found: {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"malformed recipe {path}: {e}") from None


def field_types(cls: type = Recipe) -> dict[str, type]:
    """Recipe field -> the plain type its flag parses (int for `int | None`)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if isinstance(t, types.UnionType):
            t = next(a for a in typing.get_args(t) if a is not type(None))
        out[f.name] = t
    return out


def field_help(cls: type = Recipe) -> dict[str, str]:
    """Recipe field -> the comment on its line above (the flags' help text; one source for both)."""
    out: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        src = inspect.getsource(klass)
        out.update({m[1]: m[2] for m in re.finditer(r"^    (\w+): [^#\n]*#\s*(.+)$", src, re.MULTILINE)})
    return out


def add_flags(p: argparse.ArgumentParser, cls: type = Recipe, choices: dict[str, list] | None = None) -> None:
    """One flag per recipe field (but the `model` table, TOML only), help from the field's comment; a flag not
    given stays out of the parsed namespace, so the TOML file and a resumed run's recipe show through."""
    types_, helps = field_types(cls), field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name == "model" or typing.get_origin(types_[f.name]) in (list, dict) or types_[f.name] in (list, dict):
            continue  # tables and lists are TOML-only (a stage may add its own repeatable flag for a list)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f"{helps.get(f.name, '')} (default: {default})".lstrip()
        if types_[f.name] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            p.add_argument(flag, type=types_[f.name], default=argparse.SUPPRESS, help=text,
                           **({"choices": (choices or {})[f.name]} if f.name in (choices or {}) else {}))


__all__ = ["MODEL_FIELDS", "Recipe", "RunRecipe", "add_flags", "field_help", "field_types", "load_toml"]
