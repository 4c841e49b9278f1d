"""Checkpoint contract: the name table, atomic writes, lazy loading, FP8 checkpoints in DeepSeek's layout, and
one-line errors for bad input."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dsv2 import CheckpointError, DeepseekV2, ModelConfig, load_checkpoint, save_checkpoint
from dsv2.checkpoint import from_hf, to_hf
from dsv2.model.fp8 import FP8_QUANT_CONFIG, FP8Linear, FP8RoutedExperts, convert_model_fp8, is_fp8


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


# ---- the name table ------------------------------------------------------------------------------------------
EXPERTS = "model.layers.1.mlp.experts"


def test_name_table_examples():
    assert to_hf("model.layers.1.self_attn.kv_b_proj.weight", 8) == ["model.layers.1.self_attn.kv_b_proj.weight"]
    assert to_hf(f"{EXPERTS}.w13", 2) == [f"{EXPERTS}.0.gate_proj.weight", f"{EXPERTS}.0.up_proj.weight",
                                          f"{EXPERTS}.1.gate_proj.weight", f"{EXPERTS}.1.up_proj.weight"]
    assert to_hf(f"{EXPERTS}.w2", 2) == [f"{EXPERTS}.0.down_proj.weight", f"{EXPERTS}.1.down_proj.weight"]
    assert to_hf(f"{EXPERTS}.w13_scale_inv", 1) == [f"{EXPERTS}.0.gate_proj.weight_scale_inv",
                                                    f"{EXPERTS}.0.up_proj.weight_scale_inv"]
    assert to_hf(f"{EXPERTS}.w2_scale_inv", 1) == [f"{EXPERTS}.0.down_proj.weight_scale_inv"]
    assert to_hf(f"{EXPERTS}.w13", 8, fused=True) == [f"{EXPERTS}.gate_up_proj"]  # transformers 5.x
    assert to_hf(f"{EXPERTS}.w2", 8, fused=True) == [f"{EXPERTS}.down_proj"]
    assert from_hf(f"{EXPERTS}.down_proj") == f"{EXPERTS}.w2"
    assert from_hf(f"{EXPERTS}.7.up_proj.weight_scale_inv") == f"{EXPERTS}.w13_scale_inv"
    assert from_hf("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"  # dense MLP
    assert from_hf(f"{EXPERTS}.down_proj.weight") == f"{EXPERTS}.down_proj.weight"  # no expert index: not ours


@pytest.mark.parametrize("fp8", [False, True])
def test_name_table_round_trips_every_tensor(tmp_path, fp8):
    """Over every tensor of a tiny model (plain, and FP8 with its scales): from_hf inverts to_hf (fused names
    too), no two tensors share a checkpoint name, and the names are exactly the ones save_checkpoint writes."""
    model = DeepseekV2(ModelConfig.from_preset("tiny"))
    if fp8:
        convert_model_fp8(model)
    E = model.config.n_routed_experts
    seen = []
    for name in model.state_dict():
        for fused in (False, True):
            names = to_hf(name, E, fused=fused)
            assert names and all(from_hf(k) == name for k in names), name
        seen += to_hf(name, E)
    assert len(seen) == len(set(seen))
    save_checkpoint(model, tmp_path / "ckpt")
    assert set(load_file(tmp_path / "ckpt" / "model.safetensors")) == set(seen)
    # FP8: 5 attention projections x 3 layers + 3 dense MLP + 2 x 3 shared-expert projections + 2 x E x 3 experts
    assert sum(k.endswith("_scale_inv") for k in seen) == (15 + 3 + 6 + 2 * E * 3 if fp8 else 0)


def test_experts_unstack_in_table_order(tmp_path):
    """Expert e's gate_proj is w13[e, :I], up_proj w13[e, I:], down_proj w2[e], and FP8 scales follow their
    weights (gate's block rows, then up's)."""
    torch.manual_seed(0)
    model = DeepseekV2(ModelConfig.from_preset("tiny"))
    fp8 = convert_model_fp8(copy.deepcopy(model))
    save_checkpoint(model, tmp_path / "dense")
    save_checkpoint(fp8, tmp_path / "fp8")
    dense_t = load_file(tmp_path / "dense" / "model.safetensors")
    fp8_t = load_file(tmp_path / "fp8" / "model.safetensors")
    e, ex, fx = 3, model.model.layers[1].mlp.experts, fp8.model.layers[1].mlp.experts
    I = ex.w13.shape[1] // 2
    rb = math.ceil(I / 128)
    assert torch.equal(dense_t[f"{EXPERTS}.3.gate_proj.weight"], ex.w13[e, :I])
    assert torch.equal(dense_t[f"{EXPERTS}.3.up_proj.weight"], ex.w13[e, I:])
    assert torch.equal(dense_t[f"{EXPERTS}.3.down_proj.weight"], ex.w2[e])
    assert torch.equal(fp8_t[f"{EXPERTS}.3.up_proj.weight"].view(torch.uint8), fx.w13[e, I:].view(torch.uint8))
    assert torch.equal(fp8_t[f"{EXPERTS}.3.gate_proj.weight_scale_inv"], fx.w13_scale_inv[e, :rb])
    assert torch.equal(fp8_t[f"{EXPERTS}.3.up_proj.weight_scale_inv"], fx.w13_scale_inv[e, rb:])
    assert torch.equal(fp8_t[f"{EXPERTS}.3.down_proj.weight_scale_inv"], fx.w2_scale_inv[e])


# ---- FP8 checkpoints (DeepSeek's layout) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp8_ckpts(tmp_path_factory):
    torch.manual_seed(0)
    dense = DeepseekV2(ModelConfig.from_preset("tiny")).eval()
    fp8 = convert_model_fp8(copy.deepcopy(dense))
    root = tmp_path_factory.mktemp("fp8")
    save_checkpoint(dense, root / "dense")
    save_checkpoint(fp8, root / "fp8")
    return dense, fp8, root


def _same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for n in sa:
        assert sa[n].dtype == sb[n].dtype and torch.equal(sa[n].view(torch.uint8), sb[n].view(torch.uint8)), n


def test_fp8_checkpoint_layout(fp8_ckpts):
    _, _, root = fp8_ckpts
    assert json.loads((root / "fp8" / "config.json").read_text())["quantization_config"] == FP8_QUANT_CONFIG
    assert "quantization_config" not in json.loads((root / "dense" / "config.json").read_text())
    t = load_file(root / "fp8" / "model.safetensors")
    w, s = t[f"{EXPERTS}.3.up_proj.weight"], t[f"{EXPERTS}.3.up_proj.weight_scale_inv"]
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (1, 1)
    assert t["model.layers.0.self_attn.kv_b_proj.weight"].dtype == torch.float8_e4m3fn
    # router, lm_head, embeddings and norms stay in full precision, without scales
    for n in ("lm_head.weight", "model.layers.1.mlp.gate.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert t[n].dtype == torch.float32 and n + "_scale_inv" not in t


def test_fp8_checkpoint_loads_as_stored_quantized_or_dequantized(fp8_ckpts):
    dense, fp8, root = fp8_ckpts
    stored = load_checkpoint(root / "fp8")  # as stored: the same FP8 buffers, bit for bit
    assert is_fp8(stored)
    _same_tensors(stored, fp8)
    on_load = load_checkpoint(root / "dense", fp8=True)  # quantized one tensor at a time while loading
    _same_tensors(on_load, fp8)
    deq = load_checkpoint(root / "fp8", fp8=False, dtype=torch.float32)  # dequantized into a dense model
    assert not is_fp8(deq) and not is_fp8(load_checkpoint(root / "dense"))
    kv_b = fp8.model.layers[0].self_attn.kv_b_proj
    want = kv_b.weight.float() * kv_b.weight_scale_inv  # one 128x128 block: the published formula, directly
    assert torch.equal(deq.model.layers[0].self_attn.kv_b_proj.weight, want)
    ex = fp8.model.layers[1].mlp.experts
    I = ex.w13.shape[1] // 2
    assert torch.equal(deq.model.layers[1].mlp.experts.w13[2, I:], ex.w13[2, I:].float() * ex.w13_scale_inv[2, 1])
    assert deq.model.layers[1].mlp.experts.w13.dtype == torch.float32
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.allclose(deq(ids), fp8(ids), rtol=1e-5, atol=1e-5)


def test_fp8_modules_follow_the_checkpoint(fp8_ckpts, tmp_path):
    """A checkpoint quantizing only some tensors loads with exactly those modules in FP8: the skeleton asks the
    name table which scales the checkpoint holds (per-expert scales -> the expert stack's)."""
    _, fp8, root = fp8_ckpts
    t = load_file(root / "fp8" / "model.safetensors")
    for prefix in ("model.layers.2.mlp.experts.", "model.layers.1.self_attn.o_proj."):  # store these dense
        for k in [k for k in t if k.startswith(prefix) and k.endswith("_scale_inv")]:
            w = k.removesuffix("_scale_inv")
            t[w] = t[w].float() * t.pop(k)  # every weight of the tiny preset is one block: scale [1, 1]
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "config.json").write_text((root / "fp8" / "config.json").read_text())
    save_file(t, tmp_path / "mixed" / "model.safetensors")
    back = load_checkpoint(tmp_path / "mixed")
    layers = back.model.layers
    assert isinstance(layers[1].mlp.experts, FP8RoutedExperts)
    assert isinstance(layers[1].self_attn.kv_b_proj, FP8Linear)
    assert type(layers[1].self_attn.o_proj) is nn.Linear
    assert not isinstance(layers[2].mlp.experts, FP8RoutedExperts) and layers[2].mlp.experts.w13.dtype == torch.float32
