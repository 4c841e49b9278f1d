"""Two gloo processes under torchrun (DDP and FSDP2) train like one process on the same global batch and write the
same checkpoint format; a checkpoint of either resumes on one process."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import dsv2
from dsv2.train.pretrain import checkpoints, latest_checkpoint, pretrain


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def torchrun(out, recipe, *flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dsv2.cli",
           "pretrain", "--out", str(out), "--preset", recipe.preset, "--data", recipe.data, "--tokenizer",
           recipe.tokenizer, "--seq-len", str(recipe.seq_len), "--batch-size", str(recipe.batch_size),
           "--max-steps", str(recipe.max_steps), "--warmup-steps", str(recipe.warmup_steps), "--log-every", "1",
           "--eval-every", str(recipe.eval_every), "--eval-batches", str(recipe.eval_batches), "--save-every",
           str(recipe.save_every), "--no-progress", *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def single(tmp_path_factory, corpus, tokenizer_dir):
    from dsv2.train.recipe import Recipe

    # one process, each rank's half of the global batch as one micro-batch: the balance losses see the same groups
    r = Recipe(preset="tiny", data=str(corpus), tokenizer=str(tokenizer_dir), seq_len=32, batch_size=8,
               micro_batch_size=4, max_steps=6, warmup_steps=2, lr=3e-3, log_every=1, eval_every=3, eval_batches=2,
               save_every=3, keep_last=0)
    out = tmp_path_factory.mktemp("single")
    pretrain(r, out, progress=False)
    return r, out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(single, tmp_path, mode):
    recipe, one = single
    two = tmp_path / mode
    res = torchrun(two, recipe, *(["--fsdp"] if mode == "fsdp" else []))
    assert f"2 process(es) on cpu ({'FSDP2' if mode == 'fsdp' else 'DDP'})" in res.stdout
    a, b = records(one), records(two)
    assert [(r["step"], "loss" in r) for r in a] == [(r["step"], "loss" in r) for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "lm_loss", "expert_loss", "device_loss", "comm_loss", "eval_loss", "grad_norm"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
        if "expert_load_max_over_mean" in ra:
            assert rb["expert_load_max_over_mean"] == ra["expert_load_max_over_mean"]
    # the same checkpoint format: same files, tensor names, shapes, dtypes; weights within float tolerance
    ca, cb = latest_checkpoint(one), latest_checkpoint(two)
    assert [p.name for p in checkpoints(one)] == [p.name for p in checkpoints(two)]
    assert sorted(p.name for p in ca.iterdir()) == sorted(p.name for p in cb.iterdir())
    wa, wb = load_file(ca / "model.safetensors"), load_file(cb / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and wa[k].shape == wb[k].shape
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    sa, sb = (load_file(c / "trainer_state.safetensors") for c in (ca, cb))
    assert {k for k in sa if not k.startswith("rng/")} == {k for k in sb if not k.startswith("rng/")}
    for k in sa:
        if k.startswith("optimizer/"):  # the full optimizer state, gathered from both ranks' shards under FSDP
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-3, atol=1e-6)
    assert {k for k in sb if k.startswith("rng/cpu/")} == {"rng/cpu/0", "rng/cpu/1"}
    ja, jb = (json.loads((c / "trainer_state.json").read_text()) for c in (ca, cb))
    assert ja["data"] == jb["data"] and jb["world_size"] == 2
    assert ja["optimizer"]["param_groups"] == jb["optimizer"]["param_groups"]
    dsv2.load_checkpoint(cb)
    # and a 2-process checkpoint resumes on one process
    more = dataclasses.replace(recipe, max_steps=7)
    assert pretrain(more, two, resume=True, progress=False)["step"] == 7


def test_sigterm_to_torchrun_saves_a_checkpoint(tmp_path, corpus, tokenizer_dir):
    """torchrun forwards SIGTERM to its workers; they agree on the step, save together and exit."""
    import signal
    import time

    from dsv2.train.recipe import Recipe

    out = tmp_path / "run"
    r = Recipe(preset="tiny", data=str(corpus), tokenizer=str(tokenizer_dir), seq_len=32, batch_size=8,
               max_steps=100_000, eval_every=100_000, save_every=100_000)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dsv2.cli",
           "pretrain", "--out", str(out), "--preset", "tiny", "--data", r.data, "--tokenizer", r.tokenizer,
           "--seq-len", "32", "--batch-size", "8", "--max-steps", "100000", "--log-every", "1", "--eval-every",
           "100000", "--save-every", "100000", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, metrics = time.time() + 120, out / "metrics.jsonl"
        while not metrics.is_file() or metrics.read_text().count('"loss"') < 4:  # a few steps in
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no training progress"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "SIGTERM: saved" in log, log[-3000:]
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and int(ckpt.name.split("-")[1]) >= 3
    assert pretrain(dataclasses.replace(r, max_steps=int(ckpt.name.split("-")[1]) + 1), out, resume=True,
                    progress=False)["steps_run"] == 1
