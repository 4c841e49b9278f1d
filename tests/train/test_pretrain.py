"""Tests for dsv2.train.pretrain: a whole run, exact resume, signals, divergence, full disk, bad inputs, the CLI."""

import dataclasses
import errno
import json
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dsv2
from dsv2 import checkpoint as ckpt_mod
from dsv2.cli import main
from dsv2.data import PackedDataset
from dsv2.train import pretrain as pt
from dsv2.train.pretrain import TrainingError, checkpoints, latest_checkpoint, pretrain

TRAIN_FIELDS = {"step", "tokens", "loss", "lm_loss", "expert_loss", "device_loss", "comm_loss", "grad_norm", "lr",
                "batch_size", "tokens_per_s", "expert_load_max_over_mean"}


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return [(r["step"], r.get("loss", r.get("eval_loss"))) for r in metrics(out)]


def patch_loss(monkeypatch, at_call, action):
    """Call action() when lm_loss is called for the at_call-th time (1-based), otherwise the real loss."""
    real, calls = pt.lm_loss, [0]

    def wrapped(logits, targets):
        calls[0] += 1
        loss = real(logits, targets)
        return action(loss) if calls[0] == at_call else loss

    monkeypatch.setattr(pt, "lm_loss", wrapped)


def test_run_writes_checkpoints_metrics_and_plots(recipe, tmp_path):
    # no tokenizer given: one is trained on the corpus at the preset's vocab size and saved with each checkpoint
    r = dataclasses.replace(recipe, tokenizer=None, max_steps=12)
    s = pretrain(r, tmp_path, progress=False)
    assert s["step"] == 12 and s["stopped_by"] == "done"
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000004", "step-00000008", "step-00000012"]
    ck = latest_checkpoint(tmp_path)
    assert {p.name for p in ck.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                              "tokenizer_config.json", "trainer_state.json",
                                              "trainer_state.safetensors"}  # no pickle
    model = dsv2.load_checkpoint(ck)  # the HF-layout model loads as a model, extra files and all
    assert model.config.vocab_size == 512 and model.config.bos_token_id == 0
    # optimizer state by parameter name, RNG as uint8 tensors; hyperparameters in JSON
    tensors = load_file(ck / "trainer_state.safetensors")
    names = {n for n, _ in model.named_parameters()}
    assert {k.split("/")[1] for k in tensors if k.startswith("optimizer/")} == names
    assert {k.rsplit("/", 1)[1] for k in tensors if k.startswith("optimizer/")} == {"exp_avg", "exp_avg_sq", "step"}
    assert tensors["rng/cpu/0"].dtype == torch.uint8 and tensors["expert_load"].shape == (2, 8)
    groups = json.loads((ck / "trainer_state.json").read_text())["optimizer"]["param_groups"]
    assert sorted(n for g in groups for n in g["params"]) == sorted(names) and groups[0]["betas"] == [0.9, 0.95]
    recs = metrics(tmp_path)
    train = [rec for rec in recs if "loss" in rec]
    evals = [rec for rec in recs if "eval_loss" in rec]
    assert [rec["step"] for rec in train] == list(range(1, 13))
    assert all(TRAIN_FIELDS <= set(rec) for rec in train)
    assert len(train[0]["expert_load_max_over_mean"]) == 2  # tiny: layers 1 and 2 are MoE
    assert [rec["step"] for rec in evals] == [0, 4, 8, 12]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.3  # it learns
    assert evals[-1]["eval_ppl"] == pytest.approx(2.718281828 ** evals[-1]["eval_loss"], rel=1e-6)
    assert evals[1]["expert_tokens_since"] == 0 and len(evals[1]["expert_tokens"]) == 2
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "expert_load.png").stat().st_size > 1000
    # the step schedule: warmup 2, then x0.316 past 60% and 90% of 12 steps
    lrs = [rec["lr"] for rec in train]
    assert lrs[0] == pytest.approx(1.5e-3) and lrs[5] == pytest.approx(3e-3)
    assert lrs[8] == pytest.approx(3e-3 * 0.316) and lrs[11] == pytest.approx(3e-3 * 0.316 ** 2)


def test_resume_is_exact(recipe, tmp_path):
    """2N steps straight == N steps, stop, resume N more: identical losses and weights (CPU, float32); with
    accumulation, a batch-size ramp and a share of synthetic copy sequences (their count is part of the state)."""
    r = dataclasses.replace(recipe, micro_batch_size=4, batch_size_start=4, batch_ramp_steps=4, copy_fraction=0.25)
    pretrain(r, tmp_path / "straight", progress=False)
    first = pretrain(r, tmp_path / "resumed", stop_after=3, progress=False)
    assert first["stopped_by"] == "stop_after" and latest_checkpoint(tmp_path / "resumed").name == "step-00000003"
    pretrain(r, tmp_path / "resumed", resume=True, progress=False)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    assert [rec["batch_size"] for rec in metrics(tmp_path / "straight") if "loss" in rec][:5] == [4, 5, 6, 7, 8]
    a = load_file(latest_checkpoint(tmp_path / "straight") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "resumed") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_copy_sequences_follow_the_recipe(recipe, tmp_path, monkeypatch):
    """--copy-repeats, --copy-vocab and --copy-source reach the copy sequences the batches are made of."""
    calls = []
    real = pt.copy_block
    monkeypatch.setattr(pt, "copy_block", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    r = dataclasses.replace(recipe, copy_fraction=0.5, copy_repeats=3, copy_vocab=100, max_steps=1)
    pretrain(r, tmp_path, progress=False)
    assert calls and all(k["repeats"] == 3 and k["vocab"] == 100 and k["text"] is None and not k["mixed"]
                         for k in calls)
    calls.clear()
    pretrain(dataclasses.replace(r, copy_source="text"), tmp_path / "text", progress=False)
    tokens = np.fromfile(tmp_path / "text" / "tokens.bin", dtype=calls[0]["text"].dtype)
    ds = PackedDataset(tmp_path / "text" / "tokens.bin", r.seq_len, r.val_fraction)  # held-out blocks left out:
    assert ds.n_val and calls and all(np.array_equal(k["text"], tokens) and k["n_text"] == ds.n_train * (r.seq_len + 1)
                                      and not k["mixed"] for k in calls)
    calls.clear()
    pretrain(dataclasses.replace(r, copy_source="mixed"), tmp_path / "mixed", progress=False)
    assert calls and all(k["text"] is not None and k["mixed"] for k in calls)
    with pytest.raises(ValueError, match="copy vocabulary must be"):  # more tokens than the tokenizer has
        pretrain(dataclasses.replace(r, copy_vocab=10**6), tmp_path / "too_many", progress=False)
    assert not (tmp_path / "too_many" / "metrics.jsonl").exists()  # refused before the first step


def _custom_handler(signum, frame):
    raise AssertionError("the run's own handler should have caught this")


@pytest.mark.parametrize("sig, previous", [(signal.SIGINT, "inherited"), (signal.SIGTERM, "inherited"),
                                           (signal.SIGINT, "custom"), (signal.SIGTERM, "ignored")])
def test_signal_saves_a_checkpoint_then_resume_continues(recipe, tmp_path, monkeypatch, sig, previous):
    """The run catches the signal, finishes the step, saves, and gives back whatever handlers were in place before
    (whatever pytest inherited: a background job starts with SIGINT ignored; or one set on purpose)."""
    originals = {k: signal.getsignal(k) for k in (signal.SIGINT, signal.SIGTERM)}
    try:
        if previous != "inherited":
            for k in originals:
                signal.signal(k, _custom_handler if previous == "custom" else signal.SIG_IGN)
        before = {k: signal.getsignal(k) for k in originals}
        r = dataclasses.replace(recipe, save_every=100)
        patch_loss(monkeypatch, 3, lambda loss: (os.kill(os.getpid(), sig), loss)[1])  # during step 3
        s = pretrain(r, tmp_path, progress=False)
        assert s["stopped_by"] == sig.name and s["step"] == 3
        assert latest_checkpoint(tmp_path).name == "step-00000003"
        assert {k: signal.getsignal(k) for k in originals} == before  # handlers restored
    finally:
        for k, h in originals.items():
            signal.signal(k, h)
    if previous == "inherited":  # and the run continues from that checkpoint
        monkeypatch.undo()
        s = pretrain(r, tmp_path, resume=True, progress=False)
        assert s["step"] == 8 and [rec["step"] for rec in metrics(tmp_path) if "loss" in rec] == list(range(1, 9))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(recipe, tmp_path, monkeypatch):
    r = dataclasses.replace(recipe, save_every=2)
    patch_loss(monkeypatch, 5, lambda loss: loss * float("nan"))  # step 5
    with pytest.raises(TrainingError, match=r"loss is nan .* at step 5.*Last good checkpoint: .*step-00000004"):
        pretrain(r, tmp_path, progress=False)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000002", "step-00000004"]
    dsv2.load_checkpoint(latest_checkpoint(tmp_path))


def test_full_disk_keeps_the_previous_checkpoint(recipe, tmp_path, monkeypatch):
    real, calls = ckpt_mod.save_file, [0]

    def save_file(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_file", save_file)
    with pytest.raises(TrainingError, match=r"could not write checkpoint .*step-00000008: No space left on device"
                                            r".*previous checkpoint .*step-00000004 is intact"):
        pretrain(recipe, tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000004"]  # no temp dir left
    dsv2.load_checkpoint(tmp_path / "checkpoints" / "step-00000004")
    monkeypatch.undo()
    assert pretrain(recipe, tmp_path, resume=True, progress=False)["step"] == 8


def test_bad_inputs(recipe, tmp_path, tokenizer_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        pretrain(dataclasses.replace(recipe, data=str(empty)), tmp_path / "r1", progress=False)
    with pytest.raises(ValueError, match="empty corpus"):  # also when the tokenizer is trained on it
        pretrain(dataclasses.replace(recipe, data=str(empty), tokenizer=None), tmp_path / "r1", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrain(dataclasses.replace(recipe, data=str(tmp_path / "nope")), tmp_path / "r2", progress=False)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        pretrain(dataclasses.replace(recipe, tokenizer=str(tmp_path / "nope")), tmp_path / "r3", progress=False)
    with pytest.raises(ValueError, match="tokenizer has 512 tokens but the model's vocab_size is 300"):
        pretrain(dataclasses.replace(recipe, model={"vocab_size": 300}), tmp_path / "r4", progress=False)
    # a tokenizer smaller than the model's vocabulary is fine (the extra rows are never used)
    s = pretrain(dataclasses.replace(recipe, model={"vocab_size": 600}, max_steps=1), tmp_path / "r5", progress=False)
    assert s["step"] == 1
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume"):
        pretrain(recipe, tmp_path / "r5", progress=False)


def test_cli(recipe, tmp_path, capsys):
    cfg = tmp_path / "recipe.toml"
    fields = {k: v for k, v in dataclasses.asdict(recipe).items() if v is not None and k != "model"}
    cfg.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items()))
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(cfg), "--out", str(out), "--max-steps", "2", "--no-progress"]) == 0
    assert "step 2, train loss" in capsys.readouterr().out
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["recipe"]["max_steps"] == 2 and state["recipe"]["seq_len"] == 32  # flag over file over default
    # resume: the saved recipe is the base, flags change it
    assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    assert "resuming with recipe changes: max_steps=3" in capsys.readouterr().out
    assert latest_checkpoint(out).name == "step-00000003"
    assert main(["pretrain", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "missing"), "--preset",
                 "tiny", "--no-progress"]) == 2
    assert "error: corpus path" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 2  # needs --resume


def test_bf16_autocast_and_compile_flags_on_cpu(recipe, tmp_path, capsys):
    """bf16 autocast runs on CPU when asked (the default there is float32); --compile is CUDA-only and says so."""
    s = pretrain(dataclasses.replace(recipe, dtype="bfloat16", compile=True, max_steps=2), tmp_path, progress=False)
    out = capsys.readouterr().out
    assert "bf16 autocast" in out and "--compile is for CUDA" in out
    # the losses are bf16's: close to float32's on the same steps, but not equal
    f32 = pretrain(dataclasses.replace(recipe, max_steps=2), tmp_path / "f32", progress=False)
    assert s["loss"] == pytest.approx(f32["loss"], rel=2e-2) and s["loss"] != f32["loss"]
    assert s["eval_loss"] == pytest.approx(f32["eval_loss"], rel=2e-2) and s["eval_loss"] != f32["eval_loss"]
    assert dsv2.load_checkpoint(latest_checkpoint(tmp_path)).lm_head.weight.dtype == torch.float32  # fp32 master
