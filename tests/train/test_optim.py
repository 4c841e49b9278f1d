"""Tests for dsv2.train.optim and the recipe: AdamW groups, the LR schedules, the batch-size ramp, TOML recipes."""

import math

import pytest
import torch

from dsv2 import DeepseekV2, ModelConfig
from dsv2.train.optim import batch_size_at, build_optimizer, lr_at, param_groups
from dsv2.train.recipe import Recipe, field_types, load_toml


def test_weight_decay_on_matrices_only():
    model = DeepseekV2(ModelConfig.from_preset("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert all(p.dim() == 1 for p in no_decay["params"])  # RMSNorm scales
    for must in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.experts.w13",
                 "model.layers.1.mlp.gate.weight", "model.layers.0.self_attn.kv_b_proj.weight"):
        assert must in decayed
    assert "model.layers.0.input_layernorm.weight" not in decayed
    opt = build_optimizer(model, lr=1e-3)
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_step_schedule_matches_the_paper():
    kw = dict(max_lr=2.4e-4, max_steps=1000, warmup_steps=100)
    assert lr_at(0, **kw) == pytest.approx(2.4e-6)
    assert lr_at(49, **kw) == pytest.approx(1.2e-4)
    assert lr_at(100, **kw) == lr_at(599, **kw) == 2.4e-4
    assert lr_at(600, **kw) == pytest.approx(2.4e-4 * 0.316)
    assert lr_at(899, **kw) == pytest.approx(2.4e-4 * 0.316)
    assert lr_at(900, **kw) == pytest.approx(2.4e-4 * 0.316 ** 2)
    assert lr_at(999, **kw) == pytest.approx(2.4e-4 * 0.316 ** 2)


def test_cosine_schedule():
    kw = dict(max_lr=1.0, max_steps=110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, **kw) == pytest.approx(0.1)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 1.0, 10, schedule="linear")


def test_constant_schedule_holds_the_peak_after_the_warmup():
    kw = dict(max_lr=2e-3, max_steps=100, warmup_steps=10, schedule="constant")
    assert lr_at(4, **kw) == pytest.approx(1e-3)
    assert [lr_at(s, **kw) for s in (9, 10, 60, 90, 99, 500)] == [2e-3] * 6


def test_batch_ramp():
    sizes = [batch_size_at(s, 64, start=16, ramp_steps=10, multiple_of=4) for s in range(12)]
    assert sizes[0] == 16 and sizes[10] == sizes[11] == 64
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert all(s % 4 == 0 for s in sizes)
    assert batch_size_at(0, 64) == 64  # no ramp
    assert batch_size_at(0, 64, start=1, ramp_steps=10, multiple_of=8) == 8  # never below one per rank


def test_recipe_toml_and_validation(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('preset = "tiny"\nmax_steps = 7\nlr = 1e-3\nschedule = "cosine"\n[model]\nnum_hidden_layers = 2\n')
    r = Recipe.from_dict(load_toml(f))
    assert (r.preset, r.max_steps, r.lr, r.schedule, r.model) == ("tiny", 7, 1e-3, "cosine", {"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="unknown key.*max_step"):
        Recipe.from_dict({"max_step": 3})
    with pytest.raises(ValueError, match="schedule"):
        Recipe.from_dict({"schedule": "linear"})
    with pytest.raises(ValueError, match="batch_size must be positive"):
        Recipe.from_dict({"batch_size": 0})
    (tmp_path / "bad.toml").write_text("max_steps = = 3")
    with pytest.raises(ValueError, match="malformed"):
        load_toml(tmp_path / "bad.toml")
    with pytest.raises(FileNotFoundError):
        load_toml(tmp_path / "missing.toml")
    assert field_types()["max_bytes"] is int and field_types()["compile"] is bool


def test_optimizer_state_roundtrip_by_name():
    """The trainer saves optimizer state keyed by parameter name and reads it with weights_only=True."""
    from dsv2.train import parallel

    model = DeepseekV2(ModelConfig.from_preset("tiny"))
    opt = build_optimizer(model, lr=1e-3)
    model(torch.randint(0, 512, (2, 8))).sum().backward()
    opt.step()
    d = parallel.Dist()
    state = parallel.full_optimizer_state(model, opt, d)
    assert "model.embed_tokens.weight" in state["state"]
    opt2 = build_optimizer(model, lr=1e-3)
    parallel.load_optimizer_state(model, opt2, state, d)
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(a[k]["exp_avg_sq"], b[k]["exp_avg_sq"]) for k in a)
