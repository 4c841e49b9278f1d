"""`dsv2 ablate STUDY --out DIR`: the paper's claims in miniature, one study per command.

Each study trains every variant with the same data, tokens, seeds and recipe through the run core (the pretrain
stage), then writes DIR/ablation.json and DIR/table.md (held-out loss and perplexity, total and activated
parameters, KV-cache bytes per token, train tokens/s, expert load max/mean and entropy) and the figures
DIR/loss.png (held-out loss over training) and DIR/expert_load.png (max/mean expert load over training):

    attention   MLA vs MHA vs GQA (2 KV heads) vs MQA, same MoE; also DIR/loss_vs_kv.png (loss against cache bytes)
    moe         DeepSeekMoE (2 shared + 30 fine routed, top-6) vs GShard (8 coarse, top-2) vs a dense FFN, at equal
                activated (and, for the MoEs, total) parameters
    balance     no balance loss vs expert-level only vs all three (expert, device, communication)
    routing     device-limited routing (top-6 within 3 of 8 groups) vs unrestricted top-6; also the share of
                held-out tokens whose experts span more than 3 groups
    copy        the attention study's variants on the copy task instead of text (data.copy_block: random spans
                written 4 times), a dense FFN in every layer: when does each learn to copy from its context (the
                induction pattern retrieval needs)? Instead of held-out loss: the copy loss at the end, the
                induction step (the first logged step whose loss is below halfway between uniform guessing, ln V,
                and a perfect copier, about ln V / 4) and the copy check of `dsv2 eval niah` (greedy; 32 prompts).
                Also MLA-frozen-latents: MLA whose latent down-projection W_DKV starts orthogonal and gets no
                update for the first 40% of the steps (--freeze-latents of every training command), and
                MLA-narrow-frozen-latents: the same with a latent of d_h instead of 4 d_h (at 4 heads: h/4 wide
                instead of h, the `small` preset's ratio).
                Its own scale defaults: h 128, 2 layers, 1500 steps of 16 x 128 tokens, lr 1e-3

    dsv2 ablate attention --out runs/ablate_attention                 # CPU defaults, 2 seeds
    dsv2 ablate moe --out runs/ablate_moe --hidden-size 256 --layers 6 --steps 2000 --batch-size 64   # a GPU
    dsv2 ablate copy --out runs/ablate_copy --seeds 0 --variants MHA,MLA   # about 13 min per run on a core

Every variant is DeepSeek-V2's structure at a small width (the `tiny` preset, with the sizes below derived from
--hidden-size and --heads) and differs from the study's base only where the study says. Data: --data (default:
the Python standard library sources); with neither --data nor --tokenizer, runs/demo's tokenizer is used when
present (`dsv2 demo` writes it), else (or with --vocab-size) a tokenizer is trained once into DIR/tokenizer; the token file
next to the tokenizer (runs/demo/tokens.bin, another study's DIR/tokens.bin) is reused when it was made from the
same corpus and --max-bytes, else DIR/tokens.bin is built. A run that
already finished in DIR is not trained again (its result.json is read), so an interrupted study continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dsv2.checkpoint import load_checkpoint
from dsv2.config import ModelConfig
from dsv2.data import COPY_REPEATS, COPY_VOCAB, PackedDataset, build_token_file, iter_corpus_texts
from dsv2.eval.niah import copy_check
from dsv2.infer.generate import generate
from dsv2.infer.paged import kv_bytes_per_token
from dsv2.info import parameter_counts
from dsv2.model.moe import MoEGate
from dsv2.tokenizer import Tokenizer, train_tokenizer
from dsv2.train.plots import read_metrics
from dsv2.train.pretrain import pretrain
from dsv2.train.recipe import Recipe

DEMO_RUN = Path("runs/demo")


@dataclass
class Scale:
    """The model and recipe every variant of a study shares (the CLI's scale flags)."""
    hidden_size: int = 64
    layers: int = 3
    heads: int = 4
    steps: int = 120
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 3e-3
    warmup_steps: int = 12
    evals: int = 3  # held-out evaluations over the run (the loss curves' points)
    eval_blocks: int = 64  # held-out blocks per evaluation (all of them when fewer)
    dtype: str = "auto"


# The copy study's scale: induction forms abruptly after several hundred steps at this size (MHA: about 1,000), far
# beyond the text studies' 120 steps; 2 layers is the fewest the pattern needs (one finds the previous token, the
# next matches it).
COPY_SCALE = Scale(hidden_size=128, layers=2, heads=4, steps=1500, batch_size=16, seq_len=128, lr=1e-3,
                   warmup_steps=10, evals=1, eval_blocks=16)


def default_scale(study: str) -> Scale:
    """The scale a study runs at when no flag changes it."""
    return dataclasses.replace(COPY_SCALE) if study == "copy" else Scale()


def base_model(s: Scale, vocab_size: int) -> dict:
    """DeepSeek-V2's structure at width h (ModelConfig overrides of the tiny preset). Head dims d_h = h / heads
    (nope and v), RoPE d_h / 2; MLA latent 4 d_h (V2: 512 = 4 x 128); expert unit m = h / 4 with 2 shared + 32
    routed, top-6 within 3 of 8 groups (V2's proportions); the first layer dense with the same activated width 8m."""
    dh = s.hidden_size // s.heads
    m = max(1, s.hidden_size // 4)
    return dict(vocab_size=vocab_size, hidden_size=s.hidden_size, num_hidden_layers=s.layers,
                num_attention_heads=s.heads, q_lora_rank=None, kv_lora_rank=4 * dh, qk_nope_head_dim=dh,
                qk_rope_head_dim=max(2, dh // 2 // 2 * 2), v_head_dim=dh, intermediate_size=8 * m,
                moe_intermediate_size=m, n_shared_experts=2, n_routed_experts=32, num_experts_per_tok=6,
                topk_method="group_limited_greedy", n_group=8, topk_group=3, first_k_dense_replace=1,
                aux_loss_alpha=0.003, device_loss_alpha=0.05, comm_loss_alpha=0.02,
                max_position_embeddings=max(512, s.seq_len))


def study_variants(study: str, s: Scale) -> dict[str, dict]:
    """Variant name -> its overrides of base_model (the first variant is the paper's choice)."""
    m = max(1, s.hidden_size // 4)
    if study == "attention":
        return {"MLA": {}, "MHA": {"attention_type": "mha"}, "GQA-2": {"attention_type": "gqa", "kv_heads": 2},
                "MQA": {"attention_type": "mqa"}}
    if study == "moe":  # equal activated FFN width 8m; the MoEs also equal in total (32m); no device limit
        greedy = dict(topk_method="greedy", n_group=1, topk_group=1)
        return {"DeepSeekMoE": dict(greedy, n_shared_experts=2, n_routed_experts=30, num_experts_per_tok=6),
                "GShard-top2": dict(greedy, n_shared_experts=0, n_routed_experts=8, num_experts_per_tok=2,
                                    moe_intermediate_size=4 * m),
                "Dense": dict(n_routed_experts=0, n_shared_experts=0)}
    if study == "balance":
        return {"all-three": {}, "expert-only": dict(device_loss_alpha=0.0, comm_loss_alpha=0.0),
                "none": dict(aux_loss_alpha=0.0, device_loss_alpha=0.0, comm_loss_alpha=0.0)}
    if study == "routing":
        return {"device-limited": {}, "unrestricted": dict(topk_method="greedy")}
    if study == "copy":  # attention alone differs: a dense FFN in every layer (no routing noise, faster runs)
        dense = {"first_k_dense_replace": s.layers}
        frozen = {**dense, "recipe": {"freeze_latents": round(0.4 * s.steps)}}
        return {**{name: {**v, **dense} for name, v in study_variants("attention", s).items()},
                "MLA-frozen-latents": frozen,
                # the same lever with a latent of d_h instead of 4 d_h: h/4 at 4 heads, the small preset's ratio
                "MLA-narrow-frozen-latents": {**frozen, "kv_lora_rank": max(1, s.hidden_size // s.heads)}}
    raise ValueError(f"unknown study {study!r}; choose one of: {', '.join(STUDIES)}")


STUDIES = ("attention", "moe", "balance", "routing", "copy")


def split_variant(overrides: dict) -> tuple[dict, dict]:
    """A variant's overrides -> (ModelConfig overrides, Recipe overrides: its "recipe" table, if any)."""
    model = dict(overrides)
    return model, model.pop("recipe", {})


COPY_RECIPE = dict(copy_fraction=1.0, copy_repeats=COPY_REPEATS, copy_vocab=COPY_VOCAB)  # the copy study's data


# ---- data --------------------------------------------------------------------------------------------------------
def prepare_data(out: Path, data: str | None, tokenizer: str | None, vocab_size: int | None, max_bytes: int | None,
                 progress: bool) -> tuple[Path, Path]:
    """The tokenizer directory and the token file every run of the study shares (built once, in `out`)."""
    tok_file = out / "tokens.bin"
    demo = DEMO_RUN / "tokenizer"
    if tokenizer is None and data is None and vocab_size is None and (demo / "tokenizer.json").is_file():
        tokenizer = str(demo)
    if tokenizer is not None and (Path(tokenizer).parent / "tokens.bin").is_file() and not tok_file.exists():
        # the token file of the run (or study) the tokenizer comes from: reused below if it was made from the same
        # corpus, max_bytes and tokenizer (build_token_file checks), else rebuilt here
        _link(Path(tokenizer).parent / "tokens.bin", tok_file)
    if tokenizer is None:
        tokenizer = str(out / "tokenizer")
        if not (out / "tokenizer" / "tokenizer.json").is_file():
            train_tokenizer(iter_corpus_texts(data, max_bytes), vocab_size or 4096, tokenizer)
    tok = Tokenizer.load(tokenizer)
    build_token_file(data, tok, tok_file, max_bytes=max_bytes, progress=progress)
    return Path(tokenizer).resolve(), tok_file


def _link(src: Path, dst: Path) -> None:
    """dst names the same file as src (a hard link; a copy across file systems), sidecar included."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for a, b in ((src, dst), (src.with_name(src.name + ".json"), dst.with_name(dst.name + ".json"))):
        if not a.is_file() or b.exists():
            continue
        try:
            os.link(a, b)
        except OSError:
            shutil.copyfile(a, b)


# ---- one run -----------------------------------------------------------------------------------------------------
def run_variant(run_dir: Path, model: dict, s: Scale, seed: int, tokenizer: Path, tokens: Path, data: str | None,
                max_bytes: int | None, progress: bool, copy: bool = False, extra: dict | None = None) -> dict:
    """Train one variant with one seed (or read its finished result) and measure it; copy: on the copy task
    (COPY_RECIPE), measured by copy_metrics; extra: the variant's own Recipe overrides."""
    extra = extra or {}
    result_path = run_dir / "result.json"
    if result_path.is_file():
        done = json.loads(result_path.read_text())
        if (done.get("model") == model and done.get("scale") == vars(s) and done.get("seed") == seed
                and done.get("copy", False) == copy and done.get("recipe", {}) == extra):
            return done
    _link(tokens, run_dir / "tokens.bin")  # the pretrain stage reuses it (same corpus, tokenizer and max_bytes)
    n_val = PackedDataset(tokens, s.seq_len, Recipe.val_fraction).n_val
    eval_every = max(1, s.steps // max(1, s.evals))
    recipe = Recipe(preset="tiny", model=model, tokenizer=str(tokenizer), data=data, max_bytes=max_bytes,
                    seq_len=s.seq_len, batch_size=s.batch_size, max_steps=s.steps, lr=s.lr,
                    warmup_steps=min(s.warmup_steps, s.steps), seed=seed, dtype=s.dtype,
                    log_every=max(1, min(10, eval_every)), eval_every=eval_every,
                    eval_batches=max(1, math.ceil(min(n_val, s.eval_blocks) / s.batch_size)),
                    save_every=s.steps, keep_last=1, **(COPY_RECIPE if copy else {}), **extra)
    summary = pretrain(recipe, run_dir, resume=True, progress=progress)
    if summary["stopped_by"] != "done":
        raise KeyboardInterrupt  # a signal stopped the run: the checkpoint is saved, rerun the study to continue
    records = read_metrics(run_dir / "metrics.jsonl")
    cfg = ModelConfig.from_hf(Path(summary["checkpoint"]))
    params = parameter_counts(cfg)
    res = {"model": model, **({"recipe": extra} if extra else {}), "scale": vars(s), "seed": seed,
           "eval_loss": summary["eval_loss"],
           "eval_ppl": math.exp(min(summary["eval_loss"], 50.0)),
           "total_params": params["total"], "activated_params": params["activated_excluding_embedding"],
           "attention_params_per_layer": params["layers"][0]["attention"],
           "kv_bytes_per_token_bf16": kv_bytes_per_token(cfg, "bf16"),
           # a run that finished before this process (interrupted after its last checkpoint) trained no step here:
           # its logged speed then
           "tokens_per_s": summary["tokens_per_s"] or statistics.fmean(
               r["tokens_per_s"] for r in records if "tokens_per_s" in r),
           "eval_curve": [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r],
           "train_curve": [(r["step"], r["lm_loss"]) for r in records if "lm_loss" in r],
           "load_curve": [(r["step"], *load_stats(torch.tensor(r["expert_tokens"])))
                          for r in records if "expert_tokens" in r]}
    if res["load_curve"]:
        res["load_max_over_mean"], res["load_entropy"] = res["load_curve"][-1][1:]
    if copy:
        res["copy"] = True
        res.update(copy_metrics(summary["checkpoint"], res["train_curve"], COPY_RECIPE["copy_repeats"],
                                COPY_RECIPE["copy_vocab"]))
    moe_layers = any(map(cfg.is_moe_layer, range(cfg.num_hidden_layers)))
    if moe_layers and cfg.n_routed_experts and cfg.n_expert_groups > 1:
        res["groups_per_token"], res["share_over_M_groups"] = routing_spread(summary["checkpoint"], tokens, s)
    result_path.write_text(json.dumps(res, indent=1) + "\n")
    return res


def induction_step(train_curve: list[tuple[int, float]], repeats: int, vocab: int) -> int | None:
    """The first logged step whose copy-task loss is below halfway between uniform guessing (ln vocab) and a
    perfect copier (about ln vocab / repeats: only a span's first writing is unpredictable); None if never."""
    threshold = math.log(vocab) * (1 + 1 / repeats) / 2
    return next((step for step, loss in train_curve if loss < threshold), None)


@torch.no_grad()
def copy_metrics(ckpt: str, train_curve: list[tuple[int, float]], repeats: int, vocab: int,
                 trials: int = 32) -> dict:
    """A copy-study run's measurements: the mean loss of the last tenth of its logged steps, its induction step,
    and the copy check of `dsv2 eval niah` (greedy continuation of a span seen before, letters and digits)."""
    model = load_checkpoint(ckpt, dtype=torch.float32).eval()
    tail = [loss for _, loss in train_curve[-max(1, len(train_curve) // 10):]]
    check = copy_check(Tokenizer.load(ckpt), lambda prompts: generate(model, prompts, max_new_tokens=8),
                       trials=trials)
    return {"copy_loss": statistics.fmean(tail), "induction_step": induction_step(train_curve, repeats, vocab),
            "copy_check": check}


def load_stats(load: torch.Tensor) -> tuple[float, float]:
    """load [n_moe_layers, E] tokens per expert -> (max/mean, entropy / log E), each averaged over the layers:
    1.0 and 1.0 for a perfectly even load."""
    load = load.double()
    p = load / load.sum(1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(1) / math.log(load.shape[1])
    return (load.amax(1) / load.mean(1).clamp_min(1e-12)).mean().item(), entropy.mean().item()


@torch.no_grad()
def routing_spread(ckpt: str, tokens: Path, s: Scale) -> tuple[float, float]:
    """Over the held-out blocks: the mean number of expert groups (devices) a token's top-k experts span, and the
    share of tokens spanning more than M = the base's topk_group (what device-limited routing caps)."""
    model = load_checkpoint(ckpt, dtype=torch.float32).eval()
    cfg = model.config
    per_group, M = cfg.n_routed_experts // cfg.n_group, base_model(s, cfg.vocab_size)["topk_group"]
    spans: list[torch.Tensor] = []

    def hook(_mod, _inp, out):
        groups = out[1] // per_group  # topk_idx [N, K] -> group of each chosen expert
        reached = torch.zeros(groups.shape[0], cfg.n_group, dtype=torch.bool).scatter_(1, groups, True)
        spans.append(reached.sum(1))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, MoEGate)]
    ds = PackedDataset(tokens, s.seq_len, Recipe.val_fraction)
    ids = list(range(ds.n_train, ds.n_blocks))[: s.eval_blocks]
    for i in range(0, len(ids), s.batch_size):
        model(ds.get_batch(ids[i:i + s.batch_size])[0])
    for h in handles:
        h.remove()
    span = torch.cat(spans).double()
    return span.mean().item(), (span > M).double().mean().item()


# ---- the study ---------------------------------------------------------------------------------------------------
COLUMNS = [  # (result key, table header, format)
    ("eval_loss", "held-out loss", "{:.3f}"), ("eval_ppl", "ppl", "{:.1f}"), ("total_params", "total params", "{:,}"),
    ("activated_params", "activated params", "{:,}"), ("kv_bytes_per_token_bf16", "KV bytes/token (bf16)", "{:,}"),
    ("tokens_per_s", "train tok/s", "{:,.0f}"), ("load_max_over_mean", "load max/mean", "{:.2f}"),
    ("load_entropy", "load entropy", "{:.3f}"), ("groups_per_token", "groups/token", "{:.2f}"),
    ("share_over_M_groups", "tokens > M groups", "{:.1%}"),
    ("copy_loss", "copy loss (end)", "{:.3f}"), ("induction_step", "induction step", "{:.0f}"),
    ("copy_check", "copy check", "{:.2f}"),
]
ROUTING_ONLY = ("groups_per_token", "share_over_M_groups")  # shown in the routing study's table only
COPY_ONLY = ("copy_loss", "induction_step", "copy_check")  # the copy study's, which replace held-out loss
TEXT_ONLY = ("eval_loss", "eval_ppl")  # held-out loss on the corpus: meaningless for a model trained on copying


def study_columns(study: str) -> list[tuple[str, str, str]]:
    """The COLUMNS a study's table shows (where any row has them)."""
    hide = (TEXT_ONLY if study == "copy" else COPY_ONLY) + (() if study == "routing" else ROUTING_ONLY)
    return [c for c in COLUMNS if c[0] not in hide]


def summarize(study: str, results: dict[str, list[dict]]) -> dict:
    """Per variant: the mean (and per-seed values) of every measured column."""
    rows = []
    for name, runs in results.items():
        row = {"variant": name, "seeds": [r["seed"] for r in runs], "model": runs[0]["model"]}
        for key, _, _ in study_columns(study):
            vals = [r[key] for r in runs if r.get(key) is not None]
            if vals:
                row[key] = statistics.fmean(vals)
                row[key + "_per_seed"] = vals
                if len(vals) > 1 and key == "eval_loss":
                    row["eval_loss_std"] = statistics.stdev(vals)
        if study == "copy":  # runs that never crossed the threshold: shown as such, not averaged away
            row["induction_step_per_seed"] = [r["induction_step"] for r in runs]
        rows.append(row)
    return {"study": study, "rows": rows}


def format_table(table: dict) -> str:
    rows = table["rows"]
    cols = [c for c in study_columns(table["study"]) if any(c[0] in r or c[0] + "_per_seed" in r for r in rows)]
    lines = ["| variant | " + " | ".join(h for _, h, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            if key == "induction_step":
                cells.append(", ".join("not reached" if v is None else str(v) for v in r[key + "_per_seed"]))
                continue
            if key not in r:
                cells.append("-")
                continue
            cell = fmt.format(int(r[key]) if "{:," in fmt and "f" not in fmt else r[key])
            if key == "eval_loss" and len(r[key + "_per_seed"]) > 1:
                cell += " ± {:.3f} ({})".format(r["eval_loss_std"], ", ".join(f"{v:.3f}" for v in
                                                                               r["eval_loss_per_seed"]))
            cells.append(cell)
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    seeds = sorted({s for r in rows for s in r["seeds"]})
    if table["study"] == "copy":
        lines.append(f"\nseeds {', '.join(map(str, seeds))}; copy loss: the last tenth of the logged steps; induction "
                     "step: per seed, the first logged step whose loss is below halfway between uniform guessing and "
                     "a perfect copier; copy check: greedy continuation of a span seen before (0-1); means over seeds")
    else:
        lines.append(f"\nseeds {', '.join(map(str, seeds))}; held-out loss: mean ± sample std (per seed); other "
                     "columns: means over the seeds")
    return "\n".join(lines)


def plot_study(study: str, results: dict[str, list[dict]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, (name, runs) in enumerate(results.items()):
        color = f"C{i}"
        for j, r in enumerate(runs):
            if study == "copy":
                ax.plot(*zip(*r["train_curve"]), color=color, lw=1.2, label=f"{name}" if j == 0 else None)
                continue
            ax.plot(*zip(*r["train_curve"]), color=color, lw=0.6, alpha=0.35)
            ax.plot(*zip(*r["eval_curve"]), "o-", color=color, lw=1.4, ms=3,
                    label=f"{name}" if j == 0 else None)
    if study == "copy":
        uniform, reps = math.log(COPY_RECIPE["copy_vocab"]), COPY_RECIPE["copy_repeats"]
        ax.axhline(uniform, color="gray", lw=0.8, ls="--", label="uniform guess")
        ax.axhline(uniform * (1 + 1 / reps) / 2, color="gray", lw=0.8, ls=":", label="induction threshold")
        ax.axhline(uniform / reps, color="black", lw=0.8, ls="--", label="perfect copier (about)")
        ax.set(xlabel="step", ylabel="copy-task loss (nats/token)",
               title="copy: training loss on the copy task (each seed)")
    else:
        ax.set(xlabel="step", ylabel="loss (nats/token)",
               title=f"{study}: held-out loss (lines: each seed; faint: train)")
        _zoom(ax, [v for runs in results.values() for r in runs for _, v in r["eval_curve"][1:]])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "loss.png"))
    if any(r["load_curve"] for runs in results.values() for r in runs):
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for i, (name, runs) in enumerate(results.items()):
            for j, r in enumerate(runs):
                if r["load_curve"]:
                    steps, mx, _ = zip(*r["load_curve"])
                    ax.plot(steps, mx, "o-", color=f"C{i}", lw=1.2, ms=3, label=name if j == 0 else None)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set(xlabel="step", ylabel="busiest expert / mean (per layer, averaged)",
               title=f"{study}: expert load over training (each seed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "expert_load.png"))
    if study == "attention":
        fig, ax = plt.subplots(figsize=(5.2, 3.8))
        for i, (name, runs) in enumerate(results.items()):
            kv = runs[0]["kv_bytes_per_token_bf16"]
            losses = [r["eval_loss"] for r in runs]
            ax.scatter([kv] * len(losses), losses, color=f"C{i}", s=14, alpha=0.5)
            ax.scatter([kv], [statistics.fmean(losses)], color=f"C{i}", s=60, marker="D", label=name)
        ax.set(xlabel="KV cache bytes per token (bf16, all layers)", ylabel="held-out loss",
               title="loss against KV cache (dots: seeds; diamonds: mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "loss_vs_kv.png"))
    return written


def _zoom(ax, values: list[float]) -> None:
    if values:
        lo, hi = min(values), max(values)
        pad = 0.15 * (hi - lo) + 0.02
        ax.set_ylim(lo - pad, hi + 4 * pad)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def ablate(study: str, out: str | Path, seeds: list[int] = (0, 1), scale: Scale | None = None,
           variants: list[str] | None = None, data: str | None = None, tokenizer: str | None = None,
           vocab_size: int | None = None, max_bytes: int | None = None, progress: bool = True) -> dict:
    """Run one study into `out`; returns the table (also written as out/ablation.json and out/table.md)."""
    s = scale or default_scale(study)
    all_variants = {n: split_variant(v) for n, v in study_variants(study, s).items()}  # (model, recipe) overrides
    names = list(all_variants) if not variants else variants
    unknown = [v for v in names if v not in all_variants]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)} of study {study}; choose from "
                         f"{', '.join(all_variants)}")
    if not seeds:
        raise ValueError("need at least one seed")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir, tokens = prepare_data(out, data, tokenizer, vocab_size, max_bytes, progress)
    base = base_model(s, Tokenizer.load(tok_dir).vocab_size)
    for name in names:  # every config is checked before anything trains
        ModelConfig.from_preset("tiny", **{**base, **all_variants[name][0]})
    results: dict[str, list[dict]] = {n: [] for n in names}
    jobs = [(seed, n) for seed in seeds for n in names]  # seed-major: one full comparison first
    bar = tqdm(jobs, desc=f"ablate {study}", unit="run", disable=not progress)
    for seed, name in bar:
        bar.set_postfix_str(f"{name} seed {seed}")
        model, recipe = all_variants[name]
        res = run_variant(out / "runs" / f"{name}-seed{seed}", {**base, **model}, s, seed, tok_dir, tokens, data,
                          max_bytes, progress=False, copy=study == "copy", extra=recipe)
        results[name].append(res)
        if study == "copy":
            step = "not reached" if res["induction_step"] is None else res["induction_step"]
            bar.write(f"copy: {name} seed {seed}: copy loss {res['copy_loss']:.3f}, induction step {step}, "
                      f"copy check {res['copy_check']:.2f}")
        else:
            bar.write(f"{study}: {name} seed {seed}: held-out loss {res['eval_loss']:.4f}")
    table = summarize(study, results)
    table["scale"], table["tokens_per_run"] = vars(s), s.steps * s.batch_size * s.seq_len
    (out / "ablation.json").write_text(json.dumps({**table, "runs": results}, indent=1) + "\n")
    (out / "table.md").write_text(format_table(table) + "\n")
    table["figures"] = [str(p) for p in plot_study(study, results, out)]
    return table


# ---- CLI ---------------------------------------------------------------------------------------------------------
def add_command(subparsers) -> None:
    """Register `dsv2 ablate`."""
    p = subparsers.add_parser("ablate", help="the paper's claims in miniature: attention / MoE / balance / routing "
                                             "ablations, and copy (when attention learns to copy), with a table "
                                             "and plots",
                              description=__doc__.split("\n\n")[0] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[1:]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=STUDIES, help="which comparison to run")
    p.add_argument("--out", required=True, help="study directory (runs/, ablation.json, table.md, *.png)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds; every variant runs with each (default: 0,1)")
    p.add_argument("--variants", help="comma-separated subset of the study's variants (default: all)")
    p.add_argument("--data", help="corpus (file, directory or glob; default: the Python standard library sources)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: runs/demo's if present, else trained once)")
    p.add_argument("--vocab-size", type=int, help="train a tokenizer of this vocab here (default: runs/demo's "
                                                  "tokenizer if present, else one of 4096)")
    p.add_argument("--max-bytes", type=int, help="use at most this much of the corpus")
    d, c = Scale(), COPY_SCALE
    g = p.add_argument_group("scale (the same for every variant; raise them on a GPU)")
    for name, help_ in (("hidden_size", "model width h; head dim h/heads, expert width h/4"),
                        ("layers", "decoder layers (the first dense; copy study: all dense)"), ("heads", "attention heads"),
                        ("steps", "training steps per run"), ("batch_size", "sequences per step"),
                        ("seq_len", "tokens per sequence"), ("lr", "peak learning rate"),
                        ("warmup_steps", "linear warmup steps"), ("evals", "held-out evaluations per run"),
                        ("eval_blocks", "held-out sequences per evaluation")):
        copy_default = "" if getattr(c, name) == getattr(d, name) else f"; copy study: {getattr(c, name)}"
        g.add_argument("--" + name.replace("_", "-"), type=type(getattr(d, name)), default=None,
                       help=f"{help_} (default: {getattr(d, name)}{copy_default})")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bf16 autocast on CUDA, float32 on CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_command)


def _command(args) -> int:
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    d = default_scale(args.study)
    scale = Scale(**{k: getattr(d, k) if getattr(args, k) is None else getattr(args, k) for k in vars(d)})
    for k in ("hidden_size", "layers", "heads", "steps", "batch_size", "seq_len", "evals", "eval_blocks"):
        if getattr(scale, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be positive, got {getattr(scale, k)}")
    if scale.hidden_size % scale.heads or scale.hidden_size % 4:
        raise ValueError(f"--hidden-size ({scale.hidden_size}) must be divisible by --heads ({scale.heads}) and 4")
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    table = ablate(args.study, args.out, seeds, scale, variants, args.data, args.tokenizer, args.vocab_size,
                   args.max_bytes, progress=not args.no_progress)
    print(format_table(table))
    print(f"wrote {Path(args.out) / 'ablation.json'}, {Path(args.out) / 'table.md'}, " + ", ".join(table["figures"]))
    return 0


__all__ = ["COPY_SCALE", "STUDIES", "Scale", "ablate", "add_command", "base_model", "copy_metrics", "default_scale",
           "format_table", "induction_step", "load_stats", "study_variants"]
