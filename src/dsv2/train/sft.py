"""Supervised fine-tuning: `dsv2 sft` trains a checkpoint on chat data with the loss on the assistant's tokens only.

    dsv2 tasks arithmetic --out runs/tasks
    dsv2 sft --init-from runs/demo/checkpoints/step-00000240 --data runs/tasks/sft.jsonl --out runs/sft --epochs 1
    dsv2 sft --out runs/sft --resume                                  # continue from the latest checkpoint

Data: JSONL, one conversation per line, either {"messages": [{"role": "system"|"user"|"assistant", "content": str},
...]} (multi-turn) or {"prompt": str, "completion": str} (one user turn and the assistant's answer). Each is rendered
with the checkpoint's chat template (Tokenizer.encode_chat: DeepSeek-V2's "User: ...\\n\\nAssistant: ...<eos>"); the
targets are every assistant turn's tokens and the eos closing it, found by rendering prefixes. A malformed line is an
error naming its line number; data with no assistant tokens at all is refused before any training.

No packing: each batch is padded on the right to its longest sample (at most seq_len + 1 tokens; longer samples are
cut and counted). Why: with a causal mask, right padding can never leak into a real token, so no per-sample positions
or block-diagonal mask are needed, and the model keeps its one forward (whose input_lengths applies to cached
forwards, not to training). The cost is the padding: chat samples of similar length (the synthetic tasks: within a
few tokens) waste little. Pad positions still pass through the MoE router and count in the balance losses' statistics.

The loss of a step is the mean cross-entropy over all target tokens of the step's batch (on one process; micro-batches
are weighted by their tokens, not their rows), plus the MoE balance losses. The held-out rows (val_fraction) give
eval_loss and eval_token_accuracy. The data position (epoch, index into a seeded per-epoch shuffle) is the stage's
state, so --resume continues exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from dsv2.tokenizer import Tokenizer
from dsv2.train import parallel
from dsv2.train.recipe import RunRecipe, _need
from dsv2.train.run import Run, Stage, add_run_arguments, run_command, train

ROLES = ("system", "user", "assistant")
IGNORE = -100  # target id of positions outside the loss


@dataclass
class SFTRecipe(RunRecipe):
    """SFT: the run's fields (with fine-tuning defaults) plus the chat data."""
    data: str | None = None  # JSONL of {"messages": [...]} or {"prompt", "completion"} rows (required)
    epochs: float = 0.0  # passes over the training rows; sets max_steps when > 0
    val_fraction: float = 0.05  # share of rows held out for eval_loss (at least one row when > 0)
    seq_len: int = 512  # longest sample in tokens; longer ones are cut (and counted)
    batch_size: int = 16  # global sequences per optimizer step
    max_steps: int = 200  # used when epochs is 0
    lr: float = 3e-4  # peak learning rate
    schedule: str = "cosine"  # "step", "cosine" or "constant"
    warmup_steps: int = 10  # linear warmup steps
    eval_every: int = 50  # steps between held-out evaluations
    save_every: int = 100  # steps between checkpoints

    data_hint: ClassVar[str] = "FILE.jsonl"  # named in the missing-data error

    def validate(self) -> None:
        super().validate()
        _need(self.data is not None, f"data is required (--data {self.data_hint})")
        _need(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        _need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")


# ---- data (shared with the reward model) --------------------------------------------------------------------------
def read_jsonl(path: str | Path, parse) -> list:
    """parse(row) for each non-blank line of a JSONL file; a bad line raises ValueError naming FILE:LINE and why."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            try:
                out.append(parse(row))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {e}") from None
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def chat_messages(row: dict) -> list[dict]:
    """An SFT row as chat messages: {"messages": [...]} as given (checked), {"prompt", "completion"} as one user
    turn and one assistant turn."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError('"messages" must be a non-empty list')
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{\"role\": one of {'/'.join(ROLES)}, \"content\": a "
                                 f"string}}, got {json.dumps(m, ensure_ascii=False)[:80]}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("no assistant message (nothing to learn from this row)")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "prompt" in row or "completion" in row:
        for k in ("prompt", "completion"):
            if not isinstance(row.get(k), str):
                raise ValueError(f'"{k}" must be a string')
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    raise ValueError(f'expected "messages" or "prompt" and "completion", got keys {sorted(row)}')


def split_rows(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) row indices: a seeded shuffle, the last ceil(val_fraction * n) held out (at least one
    when val_fraction > 0, never all)."""
    order = list(range(n))
    random.Random(f"split:{seed}").shuffle(order)
    n_val = min(n - 1, math.ceil(val_fraction * n)) if val_fraction > 0 else 0
    return sorted(order[: n - n_val]), sorted(order[n - n_val:])


class EpochSampler:
    """Row indices in a fresh seeded shuffle each epoch; the position (epoch, pos) is the resumable state."""

    def __init__(self, rows: list[int], seed: int):
        self.rows, self.seed, self.epoch, self.pos = rows, seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(self.rows)
        random.Random(f"epoch:{self.seed}:{self.epoch}").shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            step = min(k - len(out), len(self._order) - self.pos)
            out += self._order[self.pos:self.pos + step]
            self.pos += step
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle()


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    """[len(seqs), longest] int64, each row padded on the right with `value`."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def rank_slice(items: list, d: parallel.Dist) -> list:
    """This rank's contiguous share of a global batch (the batch size is divisible by the world size)."""
    k = len(items) // d.world_size
    return items[d.rank * k:(d.rank + 1) * k]


def micro_chunks(items: list, run: Run) -> list[list]:
    size = run.r.micro_batch_size or len(items)
    return [items[i:i + size] for i in range(0, len(items), size)]


# ---- the stage ------------------------------------------------------------------------------------------------
def encode_sft(tok: Tokenizer, conversations: list[list[dict]], max_tokens: int) -> tuple[list, int]:
    """[(ids, targets)] per conversation, cut to max_tokens: targets[t] is ids[t + 1] where that token is in the
    loss, else IGNORE (len(targets) = len(ids) - 1). Returns also how many were cut."""
    out, cut = [], 0
    for msgs in conversations:
        ids, mask = tok.encode_chat(msgs)
        if len(ids) > max_tokens:
            ids, mask, cut = ids[:max_tokens], mask[:max_tokens], cut + 1
        out.append((ids, [i if m else IGNORE for i, m in zip(ids[1:], mask[1:])]))
    return out, cut


class SFT(Stage):
    """Chat rows; loss = cross-entropy on the assistant tokens + balance losses; eval on held-out rows."""

    name = "sft"

    def setup(self, run: Run) -> None:
        r = run.r
        rows = read_jsonl(r.data, chat_messages)
        examples, cut = encode_sft(run.tok, rows, r.seq_len + 1)
        n_targets = [sum(t != IGNORE for t in tg) for _, tg in examples]
        if not sum(n_targets):
            raise ValueError(f"{r.data}: no assistant tokens within seq_len {r.seq_len} in any row: nothing to train "
                             "on (raise --seq-len?)")
        usable = [i for i, k in enumerate(n_targets) if k]  # rows whose assistant part was cut off entirely: out
        train_rows, val_rows = split_rows(len(usable), r.val_fraction, r.seed)
        self.examples = examples
        self.train_rows = [usable[i] for i in train_rows]
        self.val_rows = [usable[i] for i in val_rows]
        if r.epochs > 0:
            steps = max(1, math.ceil(r.epochs * len(self.train_rows) / r.batch_size))
            run.r = dataclasses.replace(r, max_steps=steps)
        self.sampler = EpochSampler(self.train_rows, r.seed)
        tokens = sum(len(ids) for ids, _ in examples)
        run.say(f"data: {len(rows)} rows, {tokens:,} tokens, {sum(n_targets):,} in the loss; {len(self.train_rows)} "
                f"train / {len(self.val_rows)} held-out rows" + (f"; {cut} cut to {r.seq_len + 1} tokens" if cut else "")
                + (f"; {len(rows) - len(usable)} dropped (no assistant token left)" if len(usable) < len(rows) else "")
                + (f"; {run.r.max_steps} steps = {r.epochs:g} epoch(s)" if r.epochs > 0 else ""))

    def _tensors(self, run: Run, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self.examples[i][0][:-1] for i in rows]
        tg = [self.examples[i][1] for i in rows]
        return pad_right(ids, run.tok.pad_id).to(run.device), pad_right(tg, IGNORE).to(run.device)

    def micro_batches(self, run: Run, batch_size: int):
        mine = rank_slice(self.sampler.take(batch_size), run.d)
        n_total = sum(sum(t != IGNORE for t in self.examples[i][1]) for i in mine)
        chunks = micro_chunks(mine, run)
        return [((*self._tensors(run, c), n_total, len(c) / len(mine)), len(c) / len(mine)) for c in chunks]

    def loss(self, run: Run, batch) -> dict[str, torch.Tensor]:
        x, y, n_total, share = batch
        logits = run.model(x)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum")
        lm = ce / n_total / share  # the run weights each micro-batch by `share`: the sum is the token mean
        bal = run.raw.balance_losses()
        return {"loss": lm + bal["total"], "lm_loss": lm, "expert_loss": bal["expert"]}

    def evaluate(self, run: Run) -> dict | None:
        """Cross-entropy and next-token accuracy over the held-out rows' target tokens."""
        d, r = run.d, run.r
        if not self.val_rows:
            return None
        shares = [self.val_rows[k::d.world_size] for k in range(d.world_size)]  # the first share is the largest
        mine, mb = shares[d.rank], r.micro_batch_size or max(1, r.batch_size // d.world_size)
        total = torch.zeros(3, dtype=torch.float64, device=run.device)  # loss sum, correct, tokens
        for s in range(0, len(shares[0]), mb):  # the same number of forwards on every rank (FSDP)
            part, used = (mine[s:s + mb], 1.0) if mine[s:s + mb] else (self.val_rows[:1], 0.0)
            x, y = self._tensors(run, part)
            with run.autocast():
                logits = run.raw(x).float()
            keep = y != IGNORE
            total[0] += used * F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                               reduction="sum").double()
            total[1] += used * (logits.argmax(-1) == y)[keep].sum()
            total[2] += used * keep.sum()
        parallel.all_reduce_sum(total, d)
        loss = (total[0] / total[2]).item()
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)),
                "eval_token_accuracy": (total[1] / total[2]).item()}

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def sft(recipe: SFTRecipe, out: str | Path, resume: bool = False, stop_after: int | None = None,
        progress: bool = True) -> dict:
    """Fine-tune as the recipe says, writing into `out`; returns the run core's summary (see run.train)."""
    if recipe.data is not None:  # absolute, so a resume from another directory finds the data
        recipe = dataclasses.replace(recipe, data=os.path.abspath(recipe.data))
    return train(SFT(), recipe, out, resume=resume, stop_after=stop_after, progress=progress)


# ---- CLI -------------------------------------------------------------------------------------------------------
def add_command(subparsers) -> None:
    """Register `dsv2 sft`."""
    p = subparsers.add_parser(
        "sft", help="supervised fine-tuning on chat JSONL (loss on assistant tokens; resumable)",
        description="\n\n".join(__doc__.split("\n\n")[:3]), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, SFTRecipe)
    p.set_defaults(func=lambda args: run_command(args, SFTRecipe, sft))


__all__ = ["SFT", "SFTRecipe", "add_command", "chat_messages", "encode_sft", "read_jsonl", "sft"]
