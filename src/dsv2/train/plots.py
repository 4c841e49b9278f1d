"""Training figures from DIR/metrics.jsonl: loss.png (train and eval loss) and expert_load.png (a heat map of
each MoE layer's tokens per expert, relative to an even spread).

    python -m dsv2.train.plots runs/demo     # redraw both from a run directory
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict], out: str | Path, title: str = "") -> None:
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), label="train loss (LM + balance)", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss (held out)", lw=1.5, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_expert_load(load: torch.Tensor, out: str | Path, first_moe_layer: int = 1, steps: str = "") -> None:
    """load [n_moe_layers, n_experts] token counts; each row is shown as count / row mean (1 = balanced)."""
    load = load.double()
    rel = load / load.mean(dim=1, keepdim=True).clamp_min(1e-9)
    n_layers, n_experts = rel.shape
    width, height = min(12.0, max(6.0, 0.15 * n_experts + 3)), min(10.0, max(3.0, 0.3 * n_layers + 1.5))
    fig, ax = plt.subplots(figsize=(width, height))
    im = ax.imshow(rel.numpy(), aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("routed expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(n_layers), [str(first_moe_layer + i) for i in range(n_layers)])
    span = f", {steps}" if steps else ""
    ax.set_title(f"tokens per expert / layer mean{span} (max {rel.max():.2f}, min {rel.min():.2f})", fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_expert_load_record(r: dict, out: str | Path) -> None:
    """The heat map of one metrics record holding "expert_tokens" (the load since the previous such record)."""
    plot_expert_load(torch.tensor(r["expert_tokens"]), out, r.get("first_moe_layer", 1),
                     f"steps {r.get('expert_tokens_since', 0) + 1}-{r['step']}")


def main(argv: list[str] | None = None) -> int:
    run = Path((argv or sys.argv[1:] or ["."])[0])
    records = read_metrics(run / "metrics.jsonl")
    plot_loss(records, run / "loss.png")
    loads = [r for r in records if "expert_tokens" in r]
    if loads:
        plot_expert_load_record(loads[-1], run / "expert_load.png")
    print(f"wrote {run / 'loss.png'}" + (f" and {run / 'expert_load.png'}" if loads else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
