"""Models for the inference tests: random tiny ones, and ones briefly trained on stdlib bytes.

A module of its own (not conftest.py) so test files import it by a name no other test folder shares.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from dsv2 import DeepseekV2, ModelConfig


def tiny_model(seed: int = 0, **overrides) -> DeepseekV2:
    """A random tiny model with peaked logits (init std 0.1), so greedy choices are far from ties."""
    torch.manual_seed(seed)
    return DeepseekV2(ModelConfig.from_preset("tiny", initializer_range=0.1, **overrides)).eval()


def stdlib_text(max_bytes: int) -> bytes:
    """Python's own sources: a text corpus every machine has."""
    out = bytearray()
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        out += p.read_bytes()
        if len(out) >= max_bytes:
            break
    return bytes(out[:max_bytes])


def train_bytes_model(preset: str, steps: int, batch: int = 16, seq: int = 128, lr: float = 3e-3,
                      seed: int = 0) -> DeepseekV2:
    """A model trained with AdamW on stdlib bytes (token = byte + 3), so it has real, peaked predictions."""
    threads = torch.get_num_threads()
    try:
        if preset == "tiny":
            torch.set_num_threads(1)
        return _train(preset, steps, batch, seq, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _train(preset, steps, batch, seq, lr, seed):
    torch.manual_seed(seed)
    model = DeepseekV2(ModelConfig.from_preset(preset))
    data = torch.tensor(list(stdlib_text(2_000_000)), dtype=torch.long) + 3
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss = loss + model.balance_losses()["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        opt.step()
    model.final_loss = loss.item()
    for moe in model.moe_layers():
        moe.aux = {}  # drop the last step's graph
    return model.eval()


def byte_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    text = stdlib_text(400_000)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(text) - length, (n,), generator=g).tolist()
    return [[b + 3 for b in text[s:s + length]] for s in starts]
