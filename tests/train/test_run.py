"""Tests for the run core (dsv2.train.run) through the pretraining stage: gradient clipping, fixed latent
projections (--freeze-latents), --init-from with model overrides, resume refusing changed model settings, and no
pickle in the package."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import dsv2
from dsv2.cli import main
from dsv2.train import parallel
from dsv2.train.pretrain import Pretrain, latest_checkpoint, pretrain
from dsv2.train.run import Run


def grad_norms_seen_by_optimizer(fn) -> list[float]:
    """Run fn(); return the total gradient norm at each optimizer step, as the optimizer saw it."""
    seen = []

    def hook(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(hook)
    try:
        fn()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("grad_clip", [0.05, 0.0])
def test_gradients_are_clipped_to_grad_clip(recipe, tmp_path, grad_clip):
    """The logged grad_norm is the norm before clipping; the optimizer sees at most grad_clip (0: unclipped)."""
    r = dataclasses.replace(recipe, grad_clip=grad_clip, max_steps=3, micro_batch_size=4)
    seen = grad_norms_seen_by_optimizer(lambda: pretrain(r, tmp_path, progress=False))
    logged = [json.loads(line)["grad_norm"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "grad_norm" in line]
    assert len(seen) == len(logged) == 3
    assert all(g > 0.5 for g in logged)  # far above the clip, so clipping must act
    if grad_clip:
        assert seen == pytest.approx([grad_clip] * 3, rel=1e-4)
    else:
        assert seen == pytest.approx(logged, rel=1e-4)


def _latents(ckpt) -> list[torch.Tensor]:
    """The latent down-projections' rows (W_DQ, W_DKV of every layer) of a checkpoint, each row unit length."""
    model = dsv2.load_checkpoint(ckpt, dtype=torch.float32)
    return [torch.nn.functional.normalize(w[:rows].detach(), dim=1) for w, rows in model.latent_down_weights()]


def _orthonormal(rows: torch.Tensor) -> bool:
    return torch.allclose(rows @ rows.T, torch.eye(rows.shape[0]), atol=1e-5)


@pytest.mark.parametrize("freeze", [2, 0])
def test_freeze_latents_keeps_orthogonal_latent_projections_fixed_then_trains_them(recipe, tmp_path, freeze):
    """--freeze-latents N: a new model's W_DQ and W_DKV rows start orthogonal and no step before N turns them
    (weight decay only scales them); the RoPE key's rows of the same weight train from step 1, the latents after N.
    Without it the rows are Gaussian (not orthogonal) and move at once."""
    r = dataclasses.replace(recipe, freeze_latents=freeze, max_steps=3, save_every=1, eval_every=3)
    pretrain(r, tmp_path, progress=False)
    ck = [tmp_path / "checkpoints" / f"step-{i:08d}" for i in (1, 2, 3)]
    lat = [_latents(c) for c in ck]
    assert len(lat[0]) == 2 * 3  # tiny: 3 layers, each with a query and a KV latent
    if freeze:
        assert all(_orthonormal(w) for w in lat[0] + lat[1])
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(lat[0], lat[1]))
    else:
        assert not any(_orthonormal(w) for w in lat[0])
        assert not any(torch.allclose(a, b, atol=1e-4) for a, b in zip(lat[0], lat[1]))
    assert not any(torch.allclose(a, b, atol=1e-4) for a, b in zip(lat[1], lat[2]))  # trained after step N
    models = [dsv2.load_checkpoint(c, dtype=torch.float32) for c in ck[:2]]
    rope_rows = [m.model.layers[0].self_attn.kv_a_proj_with_mqa.weight[m.config.kv_lora_rank:] for m in models]
    assert not torch.allclose(*rope_rows, atol=1e-4)


def test_freeze_latents_from_a_checkpoint_keeps_its_latents(recipe, tmp_path, source):
    """With --init-from the latents are the checkpoint's (no orthogonal redraw), fixed for the first N steps."""
    r = dataclasses.replace(recipe, init_from=str(source), freeze_latents=2, max_steps=2, save_every=1, eval_every=2)
    pretrain(r, tmp_path, progress=False)
    before, after = _latents(source), _latents(tmp_path / "checkpoints" / "step-00000002")
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(before, after))
    assert not any(_orthonormal(w) for w in before)
    with pytest.raises(ValueError, match="freeze_latents must be >= 0"):
        dataclasses.replace(recipe, freeze_latents=-1).validate()


@pytest.fixture
def source(recipe, tmp_path):
    """A short finished pretraining run's last checkpoint."""
    pretrain(dataclasses.replace(recipe, max_steps=4), tmp_path / "source", progress=False)
    return latest_checkpoint(tmp_path / "source")


def test_init_from_starts_a_new_run_from_the_weights_with_overrides(recipe, tmp_path, source):
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "mscale": 1.0,
            "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}
    r = dataclasses.replace(recipe, tokenizer=None, preset="small", init_from=str(source), max_steps=2,
                            model={"rope_scaling": yarn, "max_position_embeddings": 2048})
    run = Run(Pretrain(), r, tmp_path / "new", parallel.Dist(), progress=False)
    run.setup()
    # the checkpoint's weights (not the preset's: "small" is ignored), its tokenizer, step 0, a fresh optimizer
    want = dsv2.load_checkpoint(source).state_dict()
    got = run.raw.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert run.tok.vocab_size == 512 and run.step == 0 and not run.opt.state
    assert run.cfg.rope_scaling == yarn and run.cfg.max_position_embeddings == 2048
    s = run.train()
    assert s["step"] == 2 and s["steps_run"] == 2
    cfg = json.loads((latest_checkpoint(tmp_path / "new") / "config.json").read_text())
    assert cfg["rope_scaling"]["type"] == "yarn" and cfg["rope_scaling"]["factor"] == 4.0
    assert cfg["max_position_embeddings"] == 2048 and cfg["num_hidden_layers"] == 3  # the checkpoint's shape


def test_init_from_without_overrides_evaluates_like_the_checkpoint(recipe, tmp_path, source):
    """Same weights and held-out data: the new run's step-0 eval loss is the source run's last one, exactly."""
    s = pretrain(dataclasses.replace(recipe, init_from=str(source), max_steps=1), tmp_path / "new", progress=False)
    evals = [json.loads(line) for line in (tmp_path / "new" / "metrics.jsonl").read_text().splitlines()]
    src = json.loads((source / "trainer_state.json").read_text())["last"]
    assert evals[0]["step"] == 0 and evals[0]["eval_loss"] == src["eval_loss"]
    assert s["step"] == 1  # step 0 was the new run's start, not the source's step 4
    # the new run resumes as itself
    more = pretrain(dataclasses.replace(recipe, init_from=str(source), max_steps=2), tmp_path / "new", resume=True,
                    progress=False)
    assert more["steps_run"] == 1


def test_init_from_errors(recipe, tmp_path, source):
    with pytest.raises(dsv2.CheckpointError, match="checkpoint directory not found"):
        pretrain(dataclasses.replace(recipe, init_from=str(tmp_path / "nope")), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"\[model\] overrides .*no_such_field"):
        pretrain(dataclasses.replace(recipe, init_from=str(source), model={"no_such_field": 1}), tmp_path / "b",
                 progress=False)


def test_resume_with_changed_model_settings_is_an_error(recipe, tmp_path, capsys):
    r = dataclasses.replace(recipe, max_steps=2, model={"num_hidden_layers": 2})
    pretrain(r, tmp_path, progress=False)
    changed = dataclasses.replace(r, max_steps=3, model={"num_hidden_layers": 3, "rope_theta": 500.0})
    with pytest.raises(ValueError, match=r"changed model settings \(model.num_hidden_layers: 2 -> 3; "
                                         r"model.rope_theta: None -> 500.0\).*--init-from"):
        pretrain(changed, tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"changed model settings \(preset: 'tiny' -> 'small'\)"):
        pretrain(dataclasses.replace(r, preset="small"), tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"changed model settings \(tokenizer: .* -> '/elsewhere'\)"):
        pretrain(dataclasses.replace(r, tokenizer="/elsewhere"), tmp_path, resume=True, progress=False)
    # the CLI: exit 2 with the fields named; recipe-only changes (max_steps) still resume, with a note
    capsys.readouterr()
    assert main(["pretrain", "--out", str(tmp_path), "--resume", "--preset", "small", "--no-progress"]) == 2
    assert "changed model settings (preset: 'tiny' -> 'small')" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's usage error, exit 2
        main(["pretrain", "--out", str(tmp_path), "--resume", "--stop-after", "0", "--no-progress"])
    assert "argument --stop-after: 0 is not in 1.." in capsys.readouterr().err
    assert main(["pretrain", "--out", str(tmp_path / "typo"), "--resume", "--no-progress"]) == 2
    assert "does not exist, so there is no run to continue" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
    assert main(["pretrain", "--out", str(tmp_path), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    assert "resuming with recipe changes: max_steps=3" in capsys.readouterr().out
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    state = latest_checkpoint(tmp_path) / "trainer_state.safetensors"  # damaged: one error line naming it
    state.write_bytes(state.read_bytes()[:50])
    assert main(["pretrain", "--out", str(tmp_path), "--resume", "--max-steps", "4", "--no-progress"]) == 2
    assert "trainer_state.safetensors: damaged trainer state" in capsys.readouterr().err


def test_no_pickle_in_the_package():
    """README: "No pickle, ever." No torch.save / torch.load (nor pickle itself) anywhere in src/."""
    src = Path(dsv2.__file__).parent
    found = [f"{p.relative_to(src)}: {m[0]}" for p in src.rglob("*.py")
             for m in re.finditer(r"torch\.(save|load)\(|import pickle|pickle\.(load|dump)", p.read_text())]
    assert found == []


def test_init_from_and_model_overrides_from_a_toml_recipe(recipe, tmp_path, source):
    cfg = tmp_path / "extend.toml"
    cfg.write_text(f'init_from = "{source}"\ndata = "{recipe.data}"\nseq_len = 32\nbatch_size = 4\nmax_steps = 1\n'
                   '[model]\nmax_position_embeddings = 4096\n'
                   'rope_scaling = {type = "yarn", factor = 8, original_max_position_embeddings = 512}\n')
    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    hf = json.loads((latest_checkpoint(tmp_path / "run") / "config.json").read_text())
    assert hf["max_position_embeddings"] == 4096
    assert hf["rope_scaling"]["factor"] == 8.0 and hf["rope_scaling"]["original_max_position_embeddings"] == 512
