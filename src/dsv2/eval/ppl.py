"""Loss by position: does the model's loss keep falling as it sees more of a document?

    dsv2 eval ppl --model runs/ext/checkpoints/step-00000060 --data corpus/ --seq-len 2048 --out runs/ext/ppl

Each document of the corpus (file, directory or glob, as `dsv2 pretrain --data`; default: the embedded stdlib
sources) with at least seq_len + 1 tokens (bos included) gives one sequence: its first seq_len + 1 tokens. The
model's next-token cross-entropy at every position is averaged over the sequences and then over position buckets
(--bucket tokens wide: positions [0, b), [b, 2b), ...). A model that uses its context shows a loss falling with
position; past the trained length an unextended model's loss rises instead. Writes ppl.json and ppl.png.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dsv2.data import iter_corpus_texts


def document_sequences(tokenizer, seq_len: int, n: int, corpus: str | None = None, text_field: str = "text"
                       ) -> torch.Tensor:
    """[n', seq_len + 1] int64: the beginnings (bos + tokens) of the first n' <= n documents long enough."""
    rows = []
    for text in iter_corpus_texts(corpus, text_field=text_field):
        ids = [tokenizer.bos_id] + tokenizer.encode(text)
        if len(ids) > seq_len:
            rows.append(ids[: seq_len + 1])
            if len(rows) == n:
                break
    if not rows:
        raise ValueError(f"no document in {corpus or 'the default corpus'} has {seq_len + 1} tokens; "
                         "lower --seq-len or give longer documents")
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def position_losses(model, sequences: torch.Tensor, batch_size: int = 4, progress: bool = True) -> torch.Tensor:
    """Per-position mean next-token loss [seq_len] over sequences [N, seq_len + 1], float64."""
    dev = model.lm_head.weight.device
    total = torch.zeros(sequences.shape[1] - 1, dtype=torch.float64)
    for s in tqdm(range(0, len(sequences), batch_size), desc="ppl", unit="batch", disable=not progress):
        x = sequences[s:s + batch_size].to(dev)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="none")
        total += loss.view(x.shape[0], -1).double().sum(0).cpu()
    return total / len(sequences)


def bucket_losses(per_position: torch.Tensor, bucket: int) -> list[dict]:
    """Mean loss of positions [i * bucket, (i + 1) * bucket) (the last bucket may be shorter), with perplexity."""
    if bucket < 1:
        raise ValueError(f"--bucket must be >= 1, got {bucket}")
    out = []
    for start in range(0, len(per_position), bucket):
        part = per_position[start:start + bucket]
        loss = float(part.mean())
        out.append({"start": start, "end": start + len(part), "loss": loss, "ppl": math.exp(min(loss, 50.0))})
    return out


def plot_ppl(results: dict[str, list[dict]], path: str | Path, trained: int | None = None) -> None:
    """Loss against position (bucket centres), one line per model; a dotted line at the trained length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, buckets in results.items():
        ax.plot([(b["start"] + b["end"]) / 2 for b in buckets], [b["loss"] for b in buckets], marker="o", ms=3,
                label=name)
    if trained:
        ax.axvline(trained, color="grey", ls=":", label=f"trained length {trained}")
    ax.set_xlabel("position in the document (tokens)")
    ax.set_ylabel("next-token loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def add_parser(sub) -> None:
    from dsv2.infer.cli import _model_args

    p = sub.add_parser("ppl", help="loss by position bucket over long documents (JSON + plot)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(p)
    p.add_argument("--data", default=None, help="corpus file, directory or glob (default: the embedded stdlib sources)")
    p.add_argument("--text-field", default="text", help="field (.jsonl) or column (.parquet) holding the text")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: max_position_embeddings)")
    p.add_argument("--bucket", type=int, default=None, help="positions per bucket (default: seq_len / 16)")
    p.add_argument("--sequences", type=int, default=32, help="at most this many documents")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default=None, help="directory for ppl.json and ppl.png (default: --model)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_command)


def _command(args) -> int:
    from dsv2.infer.cli import load_engine

    if args.sequences < 1 or args.batch_size < 1:
        raise ValueError("--sequences and --batch-size must be >= 1")
    args.kv_cache_memory = "1MB"  # the forward runs without a cache here
    engine, tok, _ = load_engine(args)
    model, cfg = engine.model, engine.model.config
    seq_len = args.seq_len or cfg.max_position_embeddings
    if seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {seq_len}")
    bucket = args.bucket or max(1, seq_len // 16)
    seqs = document_sequences(tok, seq_len, args.sequences, args.data, args.text_field)
    buckets = bucket_losses(position_losses(model, seqs, args.batch_size, not args.no_progress), bucket)
    rs = cfg.rope_scaling or {}
    trained = rs.get("original_max_position_embeddings")
    res = {"model": str(args.model), "seq_len": seq_len, "sequences": len(seqs), "bucket": bucket,
           "buckets": buckets}
    out = Path(args.out or args.model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppl.json").write_text(json.dumps(res, indent=1) + "\n")
    plot_ppl({Path(args.model).name: buckets}, out / "ppl.png", trained)
    for b in buckets:
        print(f"positions {b['start']:>6}-{b['end']:<6} loss {b['loss']:.3f}  ppl {b['ppl']:.1f}")
    print(f"{len(seqs)} sequences of {seq_len} tokens; wrote {out / 'ppl.json'} and {out / 'ppl.png'}")
    return 0
