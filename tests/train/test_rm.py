"""Reward model: Bradley-Terry training lowers the pairwise loss; the checkpoint (body in the HF layout +
score.safetensors) loads back and scores by hand-computable formula; line-numbered data errors; exact resume."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dsv2.checkpoint import load_checkpoint
from dsv2.cli import main
from dsv2.tokenizer import Tokenizer
from dsv2.train.rm import HEAD_FILE, HEAD_NAME, RewardModel, RMRecipe, train_rm
from dsv2.train.run import latest_checkpoint
from dsv2.train.synthetic import preference_pairs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    rows = preference_pairs(12, seed=0)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, rows


def recipe(base, data, **kw):
    args = dict(init_from=str(base), data=str(data), seq_len=256, batch_size=12, max_steps=6, val_fraction=0,
                lr=1e-2, warmup_steps=1, log_every=1, eval_every=100, save_every=100)
    return RMRecipe(**{**args, **kw})


@pytest.fixture(scope="module")
def trained(base, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    train_rm(recipe(base, pairs[0]), out, progress=False)
    return latest_checkpoint(out)


def pairwise_loss(rm: RewardModel, rows) -> float:
    chosen = rm.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = rm.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    return -F.logsigmoid(chosen - rejected).mean().item()


@pytest.mark.slow
def test_training_lowers_the_pairwise_loss(base, pairs, trained):
    rows = pairs[1]
    start = RewardModel(load_checkpoint(base), torch.nn.Linear(64, 1, bias=False), Tokenizer.load(base))
    torch.nn.init.zeros_(start.head.weight)  # the head starts at zero: every reward 0
    assert pairwise_loss(start, rows) == pytest.approx(math.log(2))
    rm = RewardModel.load(trained)  # the run's checkpoint: body + score.safetensors
    assert pairwise_loss(rm, rows) < math.log(2) - 1e-3
    chosen = rm.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = rm.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert (chosen > rejected).float().mean() >= 0.75


def test_checkpoint_loads_back_and_scores_as_the_formula_says(base, tmp_path):
    torch.manual_seed(1)
    made = RewardModel(load_checkpoint(base), torch.nn.Linear(64, 1, bias=False), Tokenizer.load(base))
    made.save(tmp_path / "rm")
    saved = tmp_path / "rm"
    head = load_file(saved / HEAD_FILE)
    assert list(head) == [HEAD_NAME] and head[HEAD_NAME].shape == (1, 64)
    body, tok = load_checkpoint(saved).eval(), Tokenizer.load(saved)  # the body is a plain checkpoint
    rm = RewardModel.load(saved)
    prompts, completions = ["Ada has 3 pens. How many?", "x"], ["#### 3", "a much longer answer " * 4]
    got = rm.score(prompts, completions)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        text = f"{tok.bos_token}User: {p}\n\nAssistant: {c}{tok.eos_token}"  # the template, by hand
        ids = tok.encode(text, parse_special=True)
        with torch.no_grad():
            h = body(torch.tensor([ids]), return_hidden=True)[0, -1]
        assert got[i].item() == pytest.approx((head[HEAD_NAME][0] @ h).item(), rel=1e-4, abs=1e-5)
    assert torch.allclose(made.eval().score(prompts, completions), got)
    with pytest.raises(ValueError, match="2 prompts but 1"):
        rm.score(prompts, completions[:1])


def test_malformed_pair_and_missing_head(base, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    code = main(["rm", "train", "--init-from", str(base), "--data", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {path}:2: ") and '"rejected" must be a string' in err
    with pytest.raises(FileNotFoundError, match="not a reward model checkpoint"):
        RewardModel.load(base)


@pytest.mark.slow
def test_resume_is_exact(base, pairs, tmp_path):
    r = recipe(base, pairs[0], batch_size=4, micro_batch_size=2, max_steps=4, val_fraction=0.25, eval_every=2)
    train_rm(r, tmp_path / "straight", progress=False)
    train_rm(r, tmp_path / "resumed", stop_after=2, progress=False)
    train_rm(r, tmp_path / "resumed", resume=True, progress=False)
    strip = lambda out: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}  # noqa: E731
                         for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "straight") == strip(tmp_path / "resumed")
    a, b = (load_file(latest_checkpoint(tmp_path / d) / HEAD_FILE) for d in ("straight", "resumed"))
    assert torch.equal(a[HEAD_NAME], b[HEAD_NAME])
