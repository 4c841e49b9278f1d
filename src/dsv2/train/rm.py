"""Reward models: `dsv2 rm train` fits a DeepSeek-V2 body with a scalar head on pairwise preferences.

    dsv2 tasks arithmetic --out runs/tasks
    dsv2 rm train --init-from runs/sft/checkpoints/step-00000200 --data runs/tasks/pairs.jsonl --out runs/rm
    dsv2 rm train --out runs/rm --resume

    rm = dsv2.train.rm.RewardModel.load("runs/rm/checkpoints/step-00000200")
    rm.score(["Ada has 7 pens. ..."], ["Ada starts with 7 pens.\\n7 + 5 = 12\\n#### 12"])    # tensor([r])

Data: JSONL of {"prompt": str, "chosen": str, "rejected": str}. Each side is rendered as a chat, exactly as SFT
renders it: [user: prompt, assistant: completion] -> "<bos>User: {prompt}\\n\\nAssistant: {completion}<eos>".
The reward is a linear head (no bias) on the final hidden state (after the last norm) at the last token, the
eos closing the assistant turn: r = score.weight . h[last]. Loss (Bradley-Terry): -logsigmoid(r_chosen - r_rejected),
mean over the batch's pairs, plus the MoE balance losses; the head starts at zero (every reward 0, loss ln 2).
eval_loss and eval_accuracy (share of held-out pairs with r_chosen > r_rejected) come from the held-out pairs.
Pairs longer than seq_len tokens are left out (counted): cutting them would drop the token the reward is read at.

Checkpoint layout: a checkpoint directory is a normal dsv2 / HF DeepSeek-V2 checkpoint of the body (config.json,
model.safetensors, tokenizer files; it loads as a causal LM too, its lm_head unchanged and unused) plus
`score.safetensors` holding one tensor, "score.weight", float32 [1, hidden_size] (the name and shape of
transformers' *ForSequenceClassification head with num_labels = 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dsv2.checkpoint import load_checkpoint
from dsv2.model import DeepseekV2
from dsv2.tokenizer import Tokenizer
from dsv2.train import parallel
from dsv2.train.run import Run, Stage, add_run_arguments, run_command, train
from dsv2.train.sft import EpochSampler, SFTRecipe, micro_chunks, pad_right, rank_slice, read_jsonl, split_rows

HEAD_FILE = "score.safetensors"
HEAD_NAME = "score.weight"


def chat_ids(tok: Tokenizer, prompt: str, completion: str) -> list[int]:
    """The ids an RM scores: the prompt as the user turn, the completion as the assistant turn, closed by eos."""
    return tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                                   add_generation_prompt=False)


def rewards(model: nn.Module, head: nn.Linear, ids: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """[len(ids)] float32 rewards: the head on the final hidden state at each sequence's last token. `model` is the
    DeepseekV2 (or its DDP wrapper); sequences are padded on the right (causal: padding never reaches them)."""
    x = pad_right(ids, pad_id).to(device)
    last = torch.tensor([len(s) - 1 for s in ids], device=device)
    h = model(x, output_positions=last, return_hidden=True)  # [B, hidden]
    return head(h.to(head.weight.dtype)).squeeze(-1).float()


def new_head(hidden_size: int, device=None) -> nn.Linear:
    head = nn.Linear(hidden_size, 1, bias=False, device=device)
    nn.init.zeros_(head.weight)
    return head


def load_head(path: str | Path, hidden_size: int, device=None) -> nn.Linear:
    file = Path(path) / HEAD_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a reward model checkpoint: no {HEAD_FILE}")
    w = load_file(str(file)).get(HEAD_NAME)
    if w is None or tuple(w.shape) != (1, hidden_size):
        raise ValueError(f"{file}: expected tensor {HEAD_NAME!r} of shape (1, {hidden_size}), got "
                         f"{None if w is None else tuple(w.shape)}")
    head = new_head(hidden_size, device)
    with torch.no_grad():
        head.weight.copy_(w)
    return head


def save_head(head: nn.Linear, path: str | Path) -> None:
    save_file({HEAD_NAME: head.weight.detach().float().cpu().contiguous()}, str(Path(path) / HEAD_FILE),
              metadata={"format": "pt"})


class RewardModel(nn.Module):
    """A trained reward model: DeepSeek-V2 body + scalar head; `score` rates (prompt, completion) pairs."""

    def __init__(self, body: DeepseekV2, head: nn.Linear, tokenizer: Tokenizer):
        super().__init__()
        self.body, self.head, self.tokenizer = body, head, tokenizer

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        """Load an RM checkpoint directory (body in the HF layout + score.safetensors + tokenizer), in eval mode."""
        body = load_checkpoint(path, dtype=dtype, device=device)
        head = load_head(path, body.config.hidden_size, device)
        return cls(body, head, Tokenizer.load(path)).eval()

    def save(self, path: str | Path) -> None:
        from dsv2.checkpoint import save_checkpoint

        def extra(tmp: Path) -> None:
            self.tokenizer.save(tmp)
            save_head(self.head, tmp)

        save_checkpoint(self.body, path, extra=extra)

    @torch.no_grad()
    def score_ids(self, ids: list[list[int]], batch_size: int = 16) -> torch.Tensor:
        """[N] float32 rewards of token sequences (each a full rendered chat ending with the eos of the answer)."""
        dev = self.head.weight.device
        out = [rewards(self.body, self.head, ids[i:i + batch_size], self.tokenizer.pad_id, dev)
               for i in range(0, len(ids), batch_size)]
        return torch.cat(out).cpu() if out else torch.zeros(0)

    def score(self, prompts: list[str], completions: list[str], batch_size: int = 16) -> torch.Tensor:
        """[N] float32 rewards of (prompt, completion) pairs, rendered as [user: prompt, assistant: completion]
        exactly as SFT and training render them. `completions` are assistant contents (the text after
        "Assistant: "; a sample decoded after the generation prompt "Assistant:" starts with that space: strip it)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return self.score_ids([chat_ids(self.tokenizer, p, c) for p, c in zip(prompts, completions)], batch_size)


# ---- training -------------------------------------------------------------------------------------------------
@dataclass
class RMRecipe(SFTRecipe):
    """Reward model: SFT's fields and checks (fine-tuning defaults, epochs, held-out share), over preference pairs."""
    data: str | None = None  # JSONL of {"prompt", "chosen", "rejected"} rows (required)
    seq_len: int = 512  # longest rendered chat in tokens; longer pairs are left out (counted)
    batch_size: int = 16  # pairs per optimizer step
    lr: float = 1e-4  # peak learning rate

    data_hint: ClassVar[str] = "pairs.jsonl"


def _pair(row: dict) -> tuple[str, str, str]:
    for k in ("prompt", "chosen", "rejected"):
        if not isinstance(row.get(k), str):
            raise ValueError(f'"{k}" must be a string (rows are {{"prompt", "chosen", "rejected"}})')
    return row["prompt"], row["chosen"], row["rejected"]


def _drop_head_from_state_dict(module, state_dict, prefix, local_metadata) -> None:
    # the body's HF-layout weights stay exactly a DeepSeek-V2 checkpoint; the head is written as score.safetensors
    for k in [k for k in state_dict if k.startswith(prefix + "score.")]:
        del state_dict[k]


class RewardModelTraining(Stage):
    """Pairs; loss = Bradley-Terry on the head's rewards + balance losses; eval on held-out pairs."""

    name = "rm"

    def setup(self, run: Run) -> None:
        r = run.r
        rows = read_jsonl(r.data, _pair)
        pairs = [(chat_ids(run.tok, p, c), chat_ids(run.tok, p, j)) for p, c, j in rows]
        keep = [i for i, (c, j) in enumerate(pairs) if max(len(c), len(j)) <= r.seq_len]
        if not keep:
            raise ValueError(f"{r.data}: every pair is longer than seq_len {r.seq_len} tokens (raise --seq-len)")
        self.pairs = [pairs[i] for i in keep]
        train_rows, self.val_rows = split_rows(len(self.pairs), r.val_fraction, r.seed)
        if r.epochs > 0:
            run.r = dataclasses.replace(r, max_steps=max(1, math.ceil(r.epochs * len(train_rows) / r.batch_size)))
        self.sampler = EpochSampler(train_rows, r.seed)
        run.say(f"data: {len(rows)} pairs; {len(train_rows)} train / {len(self.val_rows)} held-out"
                + (f"; {len(rows) - len(keep)} longer than {r.seq_len} tokens left out" if len(keep) < len(rows) else "")
                + (f"; {run.r.max_steps} steps = {r.epochs:g} epoch(s)" if r.epochs > 0 else ""))

    def prepare_model(self, run: Run, model: DeepseekV2) -> None:
        """Attach the head as model.score (trained and checkpointed with the optimizer), kept out of the body's
        HF-layout state dict; the unused lm_head is frozen."""
        h = model.config.hidden_size
        model.score = load_head(run.ckpt, h, run.device) if run.ckpt else (
            load_head(run.r.init_from, h, run.device) if run.r.init_from and (Path(run.r.init_from) / HEAD_FILE).is_file()
            else new_head(h, run.device))
        model._register_state_dict_hook(_drop_head_from_state_dict)
        model.lm_head.requires_grad_(False)

    def save_extra(self, run: Run, directory: Path) -> None:
        save_head(run.raw.score, directory)

    def _rewards(self, run: Run, model: nn.Module, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self.pairs[i][0] for i in rows] + [self.pairs[i][1] for i in rows]
        r = rewards(model, run.raw.score, ids, run.tok.pad_id, run.device)
        return r[:len(rows)], r[len(rows):]

    def micro_batches(self, run: Run, batch_size: int):
        mine = rank_slice(self.sampler.take(batch_size), run.d)
        return [(c, len(c) / len(mine)) for c in micro_chunks(mine, run)]

    def loss(self, run: Run, batch) -> dict[str, torch.Tensor]:
        chosen, rejected = self._rewards(run, run.model, batch)
        pair = -F.logsigmoid(chosen - rejected).mean()
        bal = run.raw.balance_losses()
        return {"loss": pair + bal["total"], "pair_loss": pair.detach(), "accuracy": (chosen > rejected).float().mean(),
                "margin": (chosen - rejected).mean().detach(), "expert_loss": bal["expert"]}

    def evaluate(self, run: Run) -> dict | None:
        d, r = run.d, run.r
        if not self.val_rows:
            return None
        shares = [self.val_rows[k::d.world_size] for k in range(d.world_size)]
        mine, mb = shares[d.rank], r.micro_batch_size or max(1, r.batch_size // d.world_size)
        total = torch.zeros(3, dtype=torch.float64, device=run.device)  # loss sum, correct, pairs
        for s in range(0, len(shares[0]), mb):  # the same number of forwards on every rank (FSDP)
            part, used = (mine[s:s + mb], 1.0) if mine[s:s + mb] else (self.val_rows[:1], 0.0)
            with run.autocast():
                chosen, rejected = self._rewards(run, run.raw, part)
            total[0] += used * -F.logsigmoid(chosen - rejected).sum().double()
            total[1] += used * (chosen > rejected).sum()
            total[2] += used * len(part)
        parallel.all_reduce_sum(total, d)
        return {"eval_loss": (total[0] / total[2]).item(), "eval_accuracy": (total[1] / total[2]).item()}

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def train_rm(recipe: RMRecipe, out: str | Path, resume: bool = False, stop_after: int | None = None,
             progress: bool = True) -> dict:
    """Train a reward model as the recipe says, writing into `out`; returns the run core's summary."""
    if recipe.data is not None:
        recipe = dataclasses.replace(recipe, data=os.path.abspath(recipe.data))
    return train(RewardModelTraining(), recipe, out, resume=resume, stop_after=stop_after, progress=progress)


# ---- CLI -------------------------------------------------------------------------------------------------------
def add_command(subparsers) -> None:
    """Register `dsv2 rm train`."""
    p = subparsers.add_parser("rm", help="reward models: train one on preference pairs",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="rm_command", required=True)
    t = verbs.add_parser("train", help="train a DeepSeek-V2 body + scalar head on {prompt, chosen, rejected} pairs",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(t, RMRecipe)
    t.set_defaults(func=lambda args: run_command(args, RMRecipe, train_rm))


__all__ = ["HEAD_FILE", "HEAD_NAME", "RMRecipe", "RewardModel", "RewardModelTraining", "add_command", "chat_ids",
           "rewards", "train_rm"]
