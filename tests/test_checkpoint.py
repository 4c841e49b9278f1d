"""Checkpoint contract: names, atomic writes, lazy loading, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv2 import CheckpointError, DeepseekV2, ModelConfig, load_checkpoint, save_checkpoint
from dsv2.checkpoint import parse_size


@pytest.fixture
def ckpt(tmp_path):
    model = DeepseekV2(ModelConfig.from_preset("tiny"))
    path = tmp_path / "ckpt"
    save_checkpoint(model, path)
    return model, path


def test_names_follow_published_layout(ckpt):
    _, path = ckpt
    names = set(load_file(path / "model.safetensors"))
    for n in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.2.mlp.shared_experts.up_proj.weight",
              "model.layers.1.self_attn.q_a_layernorm.weight", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
              "model.layers.0.post_attention_layernorm.weight"]:
        assert n in names
    assert not any("w13" in n or "w2" in n.split(".")[-1] for n in names)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v2" and cfg["architectures"] == ["DeepseekV2ForCausalLM"]


def test_round_trip_with_dtype(ckpt, tmp_path):
    model, path = ckpt
    back = load_checkpoint(path, dtype=torch.bfloat16)
    assert back.lm_head.weight.dtype == torch.bfloat16
    save_checkpoint(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    exact = load_checkpoint(path)
    for (n, a), (_, b) in zip(model.state_dict().items(), exact.state_dict().items()):
        assert torch.equal(a, b), n


def test_save_is_atomic_and_keeps_old_checkpoint_on_failure(ckpt, monkeypatch):
    model, path = ckpt
    before = (path / "model.safetensors").read_bytes()

    def boom(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        save_checkpoint(model, path, extra=boom)
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]  # no temp dirs left behind


def test_extra_files_land_with_weights(ckpt):
    model, path = ckpt
    save_checkpoint(model, path, extra=lambda d: (d / "trainer.json").write_text("{}"))
    assert (path / "trainer.json").exists() and (path / "model.safetensors").exists()


def _expect(path, pattern):
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(path)


def test_missing_directory_and_config(tmp_path):
    _expect(tmp_path / "nope", "not found")
    (tmp_path / "empty").mkdir()
    _expect(tmp_path / "empty", "config.json not found")


def test_malformed_config_and_wrong_model_type(ckpt):
    _, path = ckpt
    (path / "config.json").write_text("{not json")
    _expect(path, "malformed config.json")
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _expect(path, "model_type is 'llama'")


def test_missing_extra_and_misshaped_tensors(ckpt):
    _, path = ckpt
    f = path / "model.safetensors"
    good = load_file(f)
    t = dict(good)
    del t["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(t, f)
    _expect(path, r"1 tensor\(s\) missing, e.g. model.layers.1.mlp.experts.3.up_proj.weight")
    t = dict(good, **{"model.layers.9.foo.weight": torch.zeros(1)})
    save_file(t, f)
    _expect(path, "unexpected tensor.*model.layers.9.foo.weight")
    t = dict(good, **{"model.norm.weight": torch.zeros(3)})
    save_file(t, f)
    _expect(path, r"model.norm.weight has shape \(3,\), expected \(64,\)")
    t = dict(good, **{"model.layers.2.mlp.experts.0.gate_proj.weight": torch.zeros(2, 2)})
    save_file(t, f)
    _expect(path, "experts.0.gate_proj.weight has shape")


def test_truncated_safetensors(ckpt):
    _, path = ckpt
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _expect(path, "model.safetensors")
    f.write_bytes(b"\x00" * 4)
    _expect(path, "cannot read safetensors")


def test_no_pickle_is_ever_loaded(ckpt, monkeypatch):
    _, path = ckpt

    def refuse(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    load_checkpoint(path)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("100KB") == 10**5 and parse_size("1GiB") == 2**30
    with pytest.raises(ValueError):
        parse_size("lots")


def test_v2_on_meta_allocates_nothing():
    code = ("import resource, torch; from dsv2 import DeepseekV2, ModelConfig\n"
            "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "with torch.device('meta'):\n    m = DeepseekV2(ModelConfig.from_preset('v2'))\n"
            "n = sum(p.numel() for p in m.parameters())\n"
            "assert all(p.is_meta for p in m.parameters())\n"
            "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) == 235_741_434_880
    assert int(out[1]) < 200_000  # KiB of peak RSS growth: far below the 470 GB the weights would take


def test_cli_reports_bad_checkpoint_in_one_line(tmp_path):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "dsv2.cli", "info", "--model", str(tmp_path / "missing")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr


def test_fused_expert_layout_loads(ckpt):
    """transformers 5.x holds experts fused (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]);
    a checkpoint written in that layout loads to the same model."""
    model, path = ckpt
    f = path / "model.safetensors"
    t = {n: v for n, v in load_file(f).items() if ".mlp.experts." not in n}
    for i in (1, 2):
        e = model.model.layers[i].mlp.experts
        t[f"model.layers.{i}.mlp.experts.gate_up_proj"] = e.w13.detach().clone()
        t[f"model.layers.{i}.mlp.experts.down_proj"] = e.w2.detach().clone()
    save_file(t, f)
    back = load_checkpoint(path)
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    t["model.layers.1.mlp.experts.down_proj"] = torch.zeros(3, 3)
    save_file(t, f)
    _expect(path, "experts.down_proj has shape")
