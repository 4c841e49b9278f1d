"""Tests for dsv2.train.grpo: the loss against hand computation (each aggregation, clipping on both sides, k3 KL,
masks), the mu = 1 gradient, group advantages, the Engine following in-place weight updates, a short run raising
the mean reward, exact resume, the switches and the CLI's errors."""

import dataclasses
import json
import math

import pytest
import torch

from dsv2.checkpoint import save_checkpoint
from dsv2.cli import main
from dsv2.config import ModelConfig
from dsv2.infer.engine import Engine, SamplingParams
from dsv2.model import DeepseekV2
from dsv2.tokenizer import Tokenizer
from dsv2.train import grpo as grpo_mod
from dsv2.train import rewards
from dsv2.train.grpo import GRPORecipe, group_advantages, grpo, grpo_loss
from dsv2.train.synthetic import arithmetic_tasks

# ---- the loss, by hand ------------------------------------------------------------------------------------------
# 2 completions, width 3; completion 1 has 2 tokens. Ratios exp(logp - old) chosen to land inside, above and below
# the clip range with both advantage signs.
LOGP = [[0.0, -1.0, -2.0], [-0.5, -0.2, -3.0]]
OLD = [[-0.5, -0.9, -2.0], [0.0, -0.6, -1.0]]  # ratios: e^0.5 = 1.65, e^-0.1 = 0.90, 1 | e^-0.5 = 0.61, e^0.4 = 1.49
REF = [[-0.2, -1.3, -2.5], [-0.4, -0.1, -2.0]]
ADV = [1.5, -0.7]
MASK = [[1, 1, 1], [1, 1, 0]]


def hand_loss(aggregation, clip_eps=0.2, clip_eps_high=None, beta=0.04):
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    per, lows, highs, kls = [], 0, 0, []
    for i in range(2):
        row = []
        for t in range(3):
            rho = math.exp(LOGP[i][t] - OLD[i][t])
            a = ADV[i]
            obj = min(rho * a, min(max(rho, 1 - clip_eps), 1 + hi) * a)
            kl = math.exp(REF[i][t] - LOGP[i][t]) - (REF[i][t] - LOGP[i][t]) - 1
            row.append(-obj + beta * kl)
            if MASK[i][t]:
                kls.append(kl)
                lows += rho < 1 - clip_eps and a < 0
                highs += rho > 1 + hi and a > 0
        per.append(row)
    masked = [[per[i][t] for t in range(3) if MASK[i][t]] for i in range(2)]
    n = sum(map(len, masked))
    loss = {"grpo": sum(sum(r) / len(r) for r in masked) / 2, "token": sum(map(sum, masked)) / n,
            "dr_grpo": sum(map(sum, masked)) / (2 * 3)}[aggregation]
    return loss, {"kl": sum(kls) / n, "clip_low": lows / n, "clip_high": highs / n}


def tensors():
    return (torch.tensor(LOGP, dtype=torch.float64), torch.tensor(OLD, dtype=torch.float64),
            torch.tensor(REF, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK).bool())


@pytest.mark.parametrize("aggregation", ["grpo", "token", "dr_grpo"])
@pytest.mark.parametrize("clip_eps_high", [None, 0.28, 0.7])
def test_grpo_loss_matches_hand_computation(aggregation, clip_eps_high):
    logp, old, ref, adv, mask = tensors()
    loss, stats = grpo_loss(logp, old, ref, adv, mask, clip_eps_high=clip_eps_high, aggregation=aggregation)
    want, want_stats = hand_loss(aggregation, clip_eps_high=clip_eps_high)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    for k, v in want_stats.items():
        assert stats[k].item() == pytest.approx(v, rel=1e-12), k
    # both clip sides occur in this batch (token 0: 1.65 > 1.2 with A > 0; token 3: 0.61 < 0.8 with A < 0)
    assert stats["clip_low"] > 0 and (stats["clip_high"] > 0) == (clip_eps_high != 0.7)


def test_width_is_the_generation_budget():
    """A padded column no completion reaches: grpo and token losses are unchanged, dr_grpo divides by N * T with the
    wider T (the budget), not by the longest completion."""
    pad = [torch.cat([t, torch.zeros(2, 1, dtype=t.dtype)], 1) for t in tensors()[:3]]
    mask = torch.cat([tensors()[4], torch.zeros(2, 1, dtype=torch.bool)], 1)
    for agg in ("grpo", "token"):
        assert grpo_loss(*pad, tensors()[3], mask, aggregation=agg)[0].item() == pytest.approx(hand_loss(agg)[0])
    got = grpo_loss(*pad, tensors()[3], mask, aggregation="dr_grpo")[0].item()
    assert got == pytest.approx(hand_loss("dr_grpo")[0] * 3 / 4, rel=1e-12)


def test_grpo_loss_beta_zero_needs_no_reference():
    logp, old, _, adv, mask = tensors()
    loss, stats = grpo_loss(logp, old, None, adv, mask, beta=0.0)
    assert loss.item() == pytest.approx(hand_loss("grpo", beta=0.0)[0], rel=1e-12) and stats["kl"] == 0
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, None, adv, mask)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logp, old, None, adv, mask, beta=0.0, aggregation="mean")


def test_masked_positions_change_nothing():
    logp, old, ref, adv, mask = tensors()
    junk = ~mask
    lp = logp.clone().requires_grad_()
    loss, _ = grpo_loss(lp, old, ref, adv, mask)
    loss.backward()
    lp2 = torch.where(junk, torch.full_like(logp, 7.0), logp).requires_grad_()
    loss2, _ = grpo_loss(lp2, torch.where(junk, -9.0, old), torch.where(junk, 3.0, ref), adv, mask)
    loss2.backward()
    assert loss2.item() == loss.item()
    assert torch.equal(lp.grad, lp2.grad) and (lp.grad[junk] == 0).all()


@pytest.mark.parametrize("aggregation", ["grpo", "token", "dr_grpo"])
def test_mu1_gradient_is_policy_gradient_plus_kl(aggregation):
    """With old = logp (detached), rho = 1: d loss / d logp_it = w_it (-A_i + beta (1 - pi_ref/pi)), w the
    aggregation's token weight."""
    logp, _, ref, adv, mask = tensors()
    lp = logp.clone().requires_grad_()
    loss, stats = grpo_loss(lp, lp.detach(), ref, adv, mask, beta=0.04, aggregation=aggregation)
    loss.backward()
    assert stats["ratio"].item() == 1.0 and stats["clip_low"] == 0 and stats["clip_high"] == 0
    mask = mask.double()
    n_i = mask.sum(1, keepdim=True)
    w = {"grpo": mask / (n_i * 2), "token": mask / mask.sum(), "dr_grpo": mask / 6.0}[aggregation]
    want = w * (-adv[:, None] + 0.04 * (1 - torch.exp(ref - logp)))
    torch.testing.assert_close(lp.grad, want, rtol=1e-12, atol=1e-15)


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 3.0, 0.0, 0.0]])
    a = group_advantages(r)
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    assert a[0].tolist() == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4)] * 1 + [-0.5 / (s + 1e-4),
                                                                                         0.5 / (s + 1e-4)])
    assert a[1].tolist() == [0.0] * 4  # a group whose rewards are all equal has no signal
    s3 = math.sqrt((3 * 0.75 ** 2 + 2.25 ** 2) / 3)
    assert a[2].tolist() == pytest.approx([-0.75 / (s3 + 1e-4), 2.25 / (s3 + 1e-4), -0.75 / (s3 + 1e-4),
                                           -0.75 / (s3 + 1e-4)])
    assert group_advantages(r, scale_std=False)[2].tolist() == [-0.75, 2.25, -0.75, -0.75]
    with pytest.raises(ValueError):
        group_advantages(torch.ones(3, 1))


# ---- the Engine over the policy being trained --------------------------------------------------------------------
def test_engine_follows_in_place_updates():
    torch.manual_seed(0)
    model = DeepseekV2(ModelConfig.from_preset("tiny"))
    engine = Engine(model, num_blocks=32, eos_token_id=None)
    prompt, params = [[5, 6, 7, 8, 9]], SamplingParams(max_tokens=6)
    before = engine.generate(prompt, params)[0].token_ids
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(torch.tensor([[5, 6, 7, 8, 9] + before]))[0, :, :].logsumexp(-1).sum().backward()
    opt.step()  # in place: the Engine holds the same module
    after = engine.generate(prompt, params)[0].token_ids
    fresh = DeepseekV2(model.config)  # a model that never cached anything, with the updated weights
    fresh.load_state_dict(model.state_dict())
    assert Engine(fresh, num_blocks=32, eos_token_id=None).generate(prompt, params)[0].token_ids == after
    assert after != before  # the update changed the greedy output (else the test would prove nothing)


# ---- runs --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory, tokenizer_dir_module):
    torch.manual_seed(0)
    model = DeepseekV2(ModelConfig.from_preset("tiny"))
    tok = Tokenizer.load(tokenizer_dir_module)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = tok.bos_id, tok.eos_id, \
        tok.pad_id
    path = tmp_path_factory.mktemp("init") / "ckpt"
    save_checkpoint(model, path, extra=lambda tmp: tok.save(tmp))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir_module(tmp_path_factory):
    from dsv2.tokenizer import train_tokenizer
    texts = [t["prompt"] + " " + t["solution"] for t in arithmetic_tasks(300, 0, "train")]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, 512, out)
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    for split, n in (("train", 64), ("test", 8)):
        rows = [{"prompt": t["prompt"], "answer": t["answer"]} for t in arithmetic_tasks(n, 0, split)]
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@rewards.register("digits")  # a reward a random tiny model can climb in a few steps: the share of digit characters
def _digits(arg):
    return lambda rows, completions: [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def recipe(init_ckpt, prompts):
    return GRPORecipe(init_from=str(init_ckpt), prompts=str(prompts / "train.jsonl"),
                      eval_prompts=str(prompts / "test.jsonl"), rewards=["digits", "math:0.5"], num_generations=4,
                      batch_size=16, max_completion_tokens=8, seq_len=128, lr=1e-2, max_steps=4, eval_every=100,
                      save_every=2, keep_last=0, log_every=1, kv_cache_memory="8MB")


def test_two_steps_write_metrics_samples_eval_and_plot(recipe, tmp_path):
    s = grpo(dataclasses.replace(recipe, max_steps=2), tmp_path, progress=False)
    assert s["stopped_by"] == "done" and s["step"] == 2
    recs = metrics(tmp_path)
    rec = [r for r in recs if "reward_mean" in r]
    keys = {"loss", "grpo_loss", "kl", "clip_low", "clip_high", "ratio", "entropy", "reward_mean", "reward_std",
            "reward_digits_mean", "reward_digits_std", "reward_math_mean", "zero_var_share", "completion_len_mean",
            "truncated_share", "grad_norm"}
    assert len(rec) == 2 and keys <= set(rec[-1])
    assert rec[0]["kl"] == 0 and rec[1]["kl"] > 0  # step 1: policy == reference; step 2 after one update
    assert [r["step"] for r in recs if "samples" in r] == [1, 2]
    assert [r["step"] for r in recs if "eval_accuracy" in r] == [0, 2]  # greedy held-out accuracy, before and after
    evals = [r for r in recs if "eval_accuracy" in r]
    assert all(0 < r["eval_completion_len"] <= recipe.max_completion_tokens for r in evals)
    assert (tmp_path / "reward.png").is_file()


@pytest.mark.slow
def test_short_run_raises_mean_reward(recipe, tmp_path):
    grpo(dataclasses.replace(recipe, max_steps=14, beta=0.0), tmp_path, progress=False)
    rec = [r["reward_mean"] for r in metrics(tmp_path) if "reward_mean" in r]
    assert sum(rec[-4:]) / 4 > 3 * sum(rec[:4]) / 4 + 0.05, rec
    evals = [r["eval_digits"] for r in metrics(tmp_path) if "eval_digits" in r]  # greedy, held out
    assert evals[-1] > evals[0] + 0.5, evals


@pytest.mark.slow
def test_resume_is_exact(recipe, tmp_path):
    r = dataclasses.replace(recipe, mu=2, max_steps=5, save_every=100)  # stop inside a rollout batch's updates
    full = grpo(r, tmp_path / "full", progress=False)
    part = grpo(r, tmp_path / "part", stop_after=3, progress=False)
    assert part["stopped_by"] == "stop_after" and part["step"] == 3
    again = grpo(r, tmp_path / "part", resume=True, progress=False)
    assert again["step"] == 5
    strip = [{k: v for k, v in rec.items() if k != "tokens_per_s"} for rec in metrics(tmp_path / "full")]
    assert strip == [{k: v for k, v in rec.items() if k != "tokens_per_s"} for rec in metrics(tmp_path / "part")]
    # mu = 2: the second update of a batch runs with ratio != 1
    assert any(rec.get("ratio", 1.0) != 1.0 for rec in metrics(tmp_path / "full"))


@pytest.mark.slow
def test_beta_zero_loads_no_reference(recipe, tmp_path, monkeypatch):
    loads = []
    real = grpo_mod.load_checkpoint
    monkeypatch.setattr(grpo_mod, "load_checkpoint", lambda *a, **k: loads.append(a) or real(*a, **k))
    grpo(dataclasses.replace(recipe, beta=0.0, max_steps=1, eval_prompts=None), tmp_path / "b0", progress=False)
    assert loads == []
    grpo(dataclasses.replace(recipe, max_steps=1, eval_prompts=None), tmp_path / "b1", progress=False)
    assert len(loads) == 1


def test_cli_errors(recipe, tmp_path, capsys):
    base = ["grpo", "--init-from", recipe.init_from, "--out", str(tmp_path / "x"), "--no-progress"]
    assert main(base + ["--prompts", str(tmp_path / "nope.jsonl")]) == 2
    assert "no data file at" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"answer": "2"}\n')
    assert main(base + ["--prompts", str(bad)]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
    assert main(base + ["--prompts", recipe.prompts, "--reward", "nosuch"]) == 2
    assert "unknown reward 'nosuch'" in capsys.readouterr().err
    assert main(base + ["--prompts", recipe.prompts, "--batch-size", "10", "--num-generations", "4"]) == 2
    assert "multiple of num_generations" in capsys.readouterr().err
    assert main(base + ["--prompts", recipe.prompts, "--stage", "preference"]) == 2
    assert "--reward" in capsys.readouterr().err


@rewards.register("even_digits")  # zero-variance groups on purpose: digits share for even answers, 0 for odd ones
def _even_digits(arg):
    return lambda rows, completions: [sum(ch.isdigit() for ch in c) / max(len(c), 1) if int(r["answer"]) % 2 == 0
                                      else 0.0 for r, c in zip(rows, completions)]


@pytest.mark.slow
def test_drop_zero_variance_and_mask_truncated(recipe, tmp_path):
    r = dataclasses.replace(recipe, rewards=["even_digits"], max_steps=1, eval_prompts=None)
    grpo(r, tmp_path / "a", progress=False)
    base = [x for x in metrics(tmp_path / "a") if "kept_share" in x][0]
    assert 0 < base["zero_var_share"] < 1 and base["kept_share"] == 1
    grpo(dataclasses.replace(r, drop_zero_variance=True), tmp_path / "b", progress=False)
    dropped = [x for x in metrics(tmp_path / "b") if "kept_share" in x][0]
    assert dropped["kept_share"] == pytest.approx(1 - dropped["zero_var_share"])
    assert dropped["grpo_loss"] != base["grpo_loss"]
    # an 8-token budget: the untrained model never stops, so every completion is truncated and masked out
    grpo(dataclasses.replace(r, mask_truncated=True), tmp_path / "c", progress=False)
    masked = [x for x in metrics(tmp_path / "c") if "kept_share" in x][0]
    assert masked["truncated_share"] == 1 and masked["grpo_loss"] == 0 and base["grpo_loss"] != 0
