"""Fixtures for the evaluation tests: a tokenizer trained once on a slice of the stdlib, and a tiny checkpoint with
that tokenizer beside it (what `dsv2 eval --model` and lm-eval's HF backend read)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsv2 import DeepseekV2, ModelConfig, save_checkpoint
from dsv2.data import iter_corpus_texts
from dsv2.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(iter_corpus_texts(None, max_bytes=300_000), vocab_size=512, out_dir=out)
    return Tokenizer.load(out)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A tiny model with larger-than-default random weights (peaked, tie-free predictions) and the tokenizer."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                  pad_token_id=tokenizer.pad_id, max_position_embeddings=256)
    model = DeepseekV2(cfg)
    model.init_weights(0.15)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, out, extra=tokenizer.save)
    return out
