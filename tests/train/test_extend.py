"""dsv2 extend: the rope_scaling block it writes (against transformers' own YaRN/linear RoPE and a hand formula for
the softmax mscale), the config round trip through transformers, exact resume, the retrieval mixture, errors."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from transformers import DeepseekV2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from dsv2.checkpoint import load_checkpoint, load_config
from dsv2.cli import main
from dsv2.config import ModelConfig
from dsv2.data import COPY_ALPHABET, copy_block, copy_palette, kv_retrieval_block
from dsv2.model.rope import rope_frequencies, softmax_scale
from dsv2.tokenizer import Tokenizer
from dsv2.train.extend import ExtendRecipe, extend, rope_overrides, trained_length
from dsv2.train.plots import read_metrics
from dsv2.train.pretrain import pretrain


def _hf(cfg: ModelConfig) -> DeepseekV2Config:
    return DeepseekV2Config(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")})


@pytest.mark.parametrize("rope,factor,original,d,mscale,mscale_all_dim", [
    ("yarn", 8.0, 256, 16, 0.707, 0.707),   # the recipe's small model
    ("yarn", 40.0, 4096, 64, 0.707, 0.707),  # the paper's
    ("yarn", 4.0, 1024, 32, 1.0, 0.5),       # cos/sin factor != 1
    ("yarn", 16.0, 128, 8, 0.707, 0.707),
    ("pi", 8.0, 256, 16, 0.707, 0.707),
])
def test_rope_block_matches_transformers_rope_and_hand_mscale(rope, factor, original, d, mscale, mscale_all_dim):
    r = ExtendRecipe(rope=rope, factor=factor, mscale=mscale, mscale_all_dim=mscale_all_dim)
    cfg = ModelConfig.from_preset("tiny", qk_rope_head_dim=d, **rope_overrides(r, original))
    assert cfg.max_position_embeddings == original * factor
    want_block = ({"type": "linear", "factor": factor} if rope == "pi" else
                  {"type": "yarn", "factor": factor, "original_max_position_embeddings": original, "beta_fast": 32.0,
                   "beta_slow": 1.0, "mscale": mscale, "mscale_all_dim": mscale_all_dim})
    assert cfg.rope_scaling == want_block
    if rope == "pi":  # every frequency divided by the factor (positions / S)
        plain = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        torch.testing.assert_close(rope_frequencies(cfg)[0], (plain / factor).float())
    hf = _hf(cfg)
    want_freq, want_attn = ROPE_INIT_FUNCTIONS[hf.rope_scaling["rope_type"]](hf, "cpu")
    got_freq, got_attn = rope_frequencies(cfg)
    torch.testing.assert_close(got_freq, want_freq.float(), rtol=1e-6, atol=0)
    assert got_attn == pytest.approx(want_attn if rope == "yarn" else 1.0, rel=1e-6)
    # softmax: (nope + rope)^-0.5 x (1 + 0.1 mscale_all_dim ln S)^2 under YaRN (the paper's sqrt(t) = 0.1 ln s + 1)
    m = 1 + 0.1 * mscale_all_dim * math.log(factor) if rope == "yarn" else 1.0
    assert softmax_scale(cfg) == pytest.approx((cfg.qk_nope_head_dim + d) ** -0.5 * m * m, rel=1e-12)


def test_rope_none_keeps_plain_rope():
    cfg = ModelConfig.from_preset("tiny", **rope_overrides(ExtendRecipe(rope="none", seq_len=2048), 256))
    assert cfg.rope_scaling is None and cfg.max_position_embeddings == 2048
    d = cfg.qk_rope_head_dim
    torch.testing.assert_close(rope_frequencies(cfg)[0], 10000.0 ** (-torch.arange(0, d, 2).double() / d).float())


@pytest.fixture
def base_ckpt(recipe, tmp_path):
    """A tiny model pretrained 2 steps at length 32."""
    pretrain(dataclasses.replace(recipe, max_steps=2, save_every=2), tmp_path / "base", progress=False)
    return tmp_path / "base" / "checkpoints" / "step-00000002"


def _extend_recipe(recipe, base, **kw) -> ExtendRecipe:
    fields = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)}
    fields.update(init_from=str(base), tokenizer=None, seq_len=64, batch_size=4, max_steps=2, factor=2.0,
                  kv_fraction=0.25, copy_fraction=0.25, kv_max_needles=1, eval_every=2, save_every=2,
                  eval_batches=1)
    fields.update(kw)
    return ExtendRecipe(**fields)


def test_extend_writes_a_config_transformers_reads_and_resumes_exactly(recipe, base_ckpt, tmp_path):
    r = _extend_recipe(recipe, base_ckpt)
    full = extend(r, tmp_path / "full", progress=False)
    assert full["step"] == 2
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000002"
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["max_position_embeddings"] == 64 and trained_length(base_ckpt) == 32
    hf = DeepseekV2Config.from_pretrained(ckpt)  # transformers' own reader
    assert hf.rope_scaling["rope_type"] == "yarn" and hf.max_position_embeddings == 64
    assert {k: hf.rope_scaling[k] for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                                             "mscale", "mscale_all_dim")} == {
        "factor": 2.0, "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707,
        "mscale_all_dim": 0.707}
    assert load_config(ckpt).rope_scaling == ModelConfig.from_hf(hf.to_dict()).rope_scaling  # and back
    model = load_checkpoint(ckpt)
    assert model.model.layers[0].self_attn.softmax_scale == pytest.approx(
        (16 + 8) ** -0.5 * (1 + 0.0707 * math.log(2)) ** 2)

    # interrupted after step 1 (the stop_after checkpoint) and resumed: the same losses, bit for bit
    extend(r, tmp_path / "cut", stop_after=1, progress=False)
    resumed = extend(r, tmp_path / "cut", resume=True, progress=False)
    assert resumed["step"] == 2 and resumed["steps_run"] == 1
    losses = lambda d: [(m["step"], m["loss"]) for m in read_metrics(d / "metrics.jsonl") if "loss" in m]
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    a, b = (load_checkpoint(d / "checkpoints" / "step-00000002").state_dict() for d in (tmp_path / "full",
                                                                                         tmp_path / "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_retrieval_sequences_hold_needles_then_their_questions_and_answers(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    corpus = np.asarray(tok.encode("def f(x):\n    return x + 1\n" * 400), dtype=np.uint16)
    for seed in range(5):
        block = kv_retrieval_block(corpus, len(corpus), tok, 400, np.random.default_rng(seed), max_needles=3)
        assert block.shape == (400,) and block[0] == tok.bos_id
        text = tok.decode(block.tolist())
        facts = re.findall(r"# The secret number of (\w+) is (\d+)\.\n", text)
        stated, asked = facts[: len(facts) // 2], facts[len(facts) // 2:]
        assert 1 <= len(stated) <= 3 and sorted(stated) == sorted(asked)
        assert text.rstrip().endswith(f"{asked[-1][1]}.")  # the questions close the sequence


def test_copy_sequences_are_random_spans_each_repeated(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    alphabet = {tok.encode(c)[0] for c in COPY_ALPHABET}
    for repeats, vocab in ((4, 256), (2, 100), (3, None)):
        palette = set(copy_palette(tok, vocab).tolist())
        assert alphabet <= palette and len(palette) == (vocab or len(alphabet))  # letters and digits first
        assert not palette & {tok.bos_id, tok.eos_id, tok.pad_id}
        spans, seen = [], set()
        for seed in range(4):
            block = copy_block(tok, 400, np.random.default_rng(seed), repeats=repeats, vocab=vocab)
            assert block.shape == (400,) and block[0] == tok.bos_id
            body, i = block[1:].tolist(), 0
            seen |= set(body)
            while len(body) - i >= repeats * 32:  # whole groups: a span of 8..32 tokens, written `repeats` times
                n = next(n for n in range(8, 33) if all(body[i:i + n] == body[i + k * n:i + (k + 1) * n]
                                                        for k in range(1, repeats)))
                assert body[i + repeats * n:i + (repeats + 1) * n] != body[i:i + n]  # then a new span
                spans.append(n)
                i += repeats * n
        assert seen <= palette and len(seen) > len(palette) // 2  # drawn from the whole palette, nothing else
        assert len(spans) >= 4 and len(set(spans)) > 2  # random lengths: no fixed offset to attend to, only content
    with pytest.raises(ValueError, match="at least 2 repeats"):
        copy_block(tok, 50, np.random.default_rng(0), repeats=1)
    with pytest.raises(ValueError, match="copy vocabulary must be"):
        copy_palette(tok, 10)


def test_copy_spans_from_text_and_amid_text(tokenizer_dir):
    """copy source "text": each span is a window of the given corpus tokens at a random offset, written `repeats`
    times, drawn only from the first n_text tokens; "mixed": palette spans amid such windows."""
    tok = Tokenizer.load(tokenizer_dir)
    text = np.arange(10_000, 12_000, dtype=np.uint16)  # distinct ids: a window is a run of consecutive ones
    block = copy_block(tok, 400, np.random.default_rng(0), repeats=2, text=text, n_text=1_000)
    assert block[0] == tok.bos_id
    body, i, starts = block[1:].tolist(), 0, []
    while len(body) - i >= 2 * 32:
        n = next(n for n in range(8, 33) if body[i + n] == body[i])  # where the window starts over
        assert body[i:i + n] == list(range(body[i], body[i] + n)) == body[i + n:i + 2 * n]
        starts.append(body[i])
        i += 2 * n
    assert len(starts) >= 4 and len(set(starts)) == len(starts) and max(starts) + 32 <= 11_000
    with pytest.raises(ValueError, match="need more text than 20 tokens"):
        copy_block(tok, 50, np.random.default_rng(0), text=text, n_text=20)

    # "mixed": palette spans as before, each of their occurrences after a window of 0..32 corpus tokens
    palette = set(copy_palette(tok, 36).tolist())
    body = copy_block(tok, 600, np.random.default_rng(1), repeats=3, vocab=36, text=text, n_text=1_000,
                      mixed=True)[1:].tolist()
    assert set(body) <= palette | set(range(10_000, 11_000))
    runs, cur = [], [body[0]]  # maximal runs of text (consecutive ids) and of palette tokens
    for a, b in zip(body, body[1:]):
        if (a >= 10_000) == (b >= 10_000) and (a < 10_000 or b == a + 1):
            cur.append(b)
        else:
            runs.append(cur)
            cur = [b]
    spans = [r for r in runs if r[0] < 10_000]
    windows = [r for r in runs if r[0] >= 10_000]
    assert len(windows) >= 6 and all(len(w) <= 32 for w in windows) and len(spans) >= 6
    for i in range(0, len(spans) - 3, 3):  # every span three times, text (almost always) between
        assert 8 <= len(spans[i]) <= 32 and spans[i] == spans[i + 1] == spans[i + 2] != spans[i + 3]
    with pytest.raises(ValueError, match="mixed copy sequences need corpus text"):
        copy_block(tok, 50, np.random.default_rng(0), mixed=True)


def test_extend_needs_init_from_and_a_known_rope(tmp_path, capsys):
    assert main(["extend", "--out", str(tmp_path / "x"), "--steps", "1"]) == 2
    assert capsys.readouterr().err.strip() == ("error: extend needs --init-from CKPT: the checkpoint whose context to "
                                               "extend")
    with pytest.raises(ValueError, match="rope must be yarn, pi or none"):
        ExtendRecipe(rope="ntk").validate()
    with pytest.raises(ValueError, match=r"kv_fraction \+ copy_fraction must be at most 1"):
        ExtendRecipe(kv_fraction=0.6, copy_fraction=0.5).validate()
    with pytest.raises(ValueError, match="copy_repeats must be at least 2"):
        ExtendRecipe(copy_repeats=1).validate()
    with pytest.raises(ValueError, match="copy_vocab must be at least 36"):
        ExtendRecipe(copy_vocab=20).validate()
    with pytest.raises(ValueError, match="copy_source must be one of random, text, mixed"):
        ExtendRecipe(copy_source="prose").validate()
    with pytest.raises(ValueError, match="factor must be >= 1"):
        ExtendRecipe(factor=0.5).validate()
