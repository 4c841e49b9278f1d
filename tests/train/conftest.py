"""Fixtures for the training tests: a small real corpus (a few stdlib modules), a tokenizer trained on it once,
and a recipe for the `tiny` preset that trains a step in milliseconds."""

import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from dsv2 import DeepseekV2, ModelConfig, save_checkpoint
from dsv2.data import iter_corpus_texts
from dsv2.tokenizer import Tokenizer, train_tokenizer
from dsv2.train.recipe import Recipe

MODULES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py",
           "shlex.py"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("corpus")
    for name in MODULES:
        shutil.copy(root / name, out / name.replace("/", "_"))
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(iter_corpus_texts(corpus), 512, out)
    return out


@pytest.fixture
def recipe(corpus, tokenizer_dir) -> Recipe:
    return Recipe(preset="tiny", data=str(corpus), tokenizer=str(tokenizer_dir), seq_len=32, batch_size=8,
                  max_steps=8, warmup_steps=2, lr=3e-3, log_every=1, eval_every=4, eval_batches=2, save_every=4,
                  keep_last=0)


@pytest.fixture(scope="session")
def base(tmp_path_factory, tokenizer_dir):
    """A random tiny checkpoint with the tokenizer beside it, to --init-from (SFT, RM)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base") / "ckpt"
    model = DeepseekV2(ModelConfig.from_preset("tiny", vocab_size=512))
    save_checkpoint(model, out, extra=lambda tmp: Tokenizer.load(tokenizer_dir).save(tmp))
    return out
