"""Fixtures for the inference tests: tiny models (random and briefly trained), a tiny tokenizer, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsv2 import DeepseekV2, save_checkpoint
from dsv2.tokenizer import train_tokenizer
from infer_models import stdlib_text, tiny_model, train_bytes_model


@pytest.fixture(scope="session")
def trained_tiny() -> DeepseekV2:
    return train_bytes_model("tiny", steps=150)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    text = stdlib_text(300_000).decode("utf-8", errors="ignore")
    train_tokenizer([text[i:i + 2000] for i in range(0, len(text), 2000)], vocab_size=512, out_dir=out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """A random tiny model saved with a tokenizer beside it (what `dsv2 serve --model` reads)."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny"

    def add_tokenizer(tmp: Path) -> None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (tmp / f).write_bytes((tokenizer_dir / f).read_bytes())

    save_checkpoint(tiny_model(), out, extra=add_tokenizer)
    return out
