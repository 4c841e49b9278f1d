"""Real size on one machine: the FP8 CPU kernel against the published dequantization formula, `dsv2 init`
(the `small` preset loads and generates; fp8 output equals `dsv2 quantize` of the bf16 output), loading that fits
(memory check, each tensor quantized once, no file mapping left), streaming writes, the CLI's dtype default."""

import json
import weakref

import pytest
import torch
import torch.nn.functional as F

import dsv2.checkpoint as ckpt
import dsv2.model.fp8 as fp8
from dsv2 import DeepseekV2, ModelConfig, generate
from dsv2.checkpoint import CheckpointError, load_checkpoint, quantize_checkpoint
from dsv2.cli import main
from dsv2.init import init_checkpoint
from dsv2.model import fp8_cpu
from dsv2.tokenizer import train_tokenizer
from dsv2.model.fp8 import FP8Linear, FP8RoutedExperts, fp8_linear, is_fp8, quantize_fp8_blockwise

needs_kernel = pytest.mark.skipif(not fp8_cpu.available(), reason="FP8 CPU kernel not buildable here "
                                  "(no C compiler or no AVX2/FMA/F16C)")


def _published_dequant(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """W = weight.float() * weight_scale_inv, one block at a time, written plainly (float32)."""
    w = q.float()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            w[i * block:(i + 1) * block, j * block:(j + 1) * block] *= s[i, j]
    return w


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


# ---- the kernel ------------------------------------------------------------------------------------------------
@needs_kernel
@pytest.mark.parametrize("N,K,M", [(300, 200, 1), (96, 176, 1), (128, 256, 5), (257, 129, 9), (64, 24, 3)])
def test_cpu_kernel_equals_published_formula(N, K, M):
    """Partial blocks in both directions, K not a multiple of 16 (and at M = 1, block tails of 32 + 16 + 8),
    batches over and under the kernel's 4-row pass;
    every e4m3 code (subnormals, zero, both signs) appears in the weight."""
    g = torch.Generator().manual_seed(N + K)
    q = torch.randint(0, 256, (N, K), dtype=torch.uint8, generator=g)
    q[q == 0x7F] = 0  # e4m3fn's NaN codes (0x7F, 0xFF) are no weights
    q[q == 0xFF] = 1
    q.view(-1)[:254] = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)
    q = q.view(torch.float8_e4m3fn)
    s = torch.rand(-(-N // 128), -(-K // 128), generator=g) * 1e-3 + 1e-5
    x = torch.randn(M, K, generator=g)
    want = x.double() @ _published_dequant(q, s).double().T
    got = fp8_linear(x, q, s)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    got_bf16 = fp8_linear(x.bfloat16(), q, s)  # bf16 activations: float32 accumulation, one rounding at the end
    assert got_bf16.dtype == torch.bfloat16
    want_bf16 = x.bfloat16().double() @ _published_dequant(q, s).double().T
    assert torch.allclose(got_bf16.double(), want_bf16, rtol=2**-7, atol=1e-3 * want_bf16.abs().max().item())


@needs_kernel
def test_kernel_path_is_what_the_fp8_model_runs(monkeypatch):
    """FP8Linear and the expert paths (single token and loop) go through the kernel on CPU and agree with the
    dequantize-then-matmul fallback; with the kernel, no weight is dequantized (kv_b_proj's absorbed matrix
    aside, kept between steps)."""
    torch.manual_seed(0)
    model = fp8.convert_model_fp8(DeepseekV2(ModelConfig.from_preset("tiny", initializer_range=0.1)).eval())
    ids = torch.randint(3, 512, (2, 12))
    deq = []
    real = fp8.dequantize_fp8_blockwise
    monkeypatch.setattr(fp8, "dequantize_fp8_blockwise", lambda q, *a, **k: deq.append(q.shape) or real(q, *a, **k))
    with torch.no_grad():
        prefill = model(ids)  # no cache: naive attention, kv_b_proj as a product
        assert deq == []
        one = generate(model, [ids[0].tolist()], 6)
        kv_b = [m.self_attn.kv_b_proj.weight.shape for m in model.model.layers]
        assert all(s in kv_b for s in deq) and len(deq) <= len(kv_b)  # absorption: once per layer, then kept
        monkeypatch.setattr(fp8_cpu, "_lib", False)
        ref = model(ids)
        assert generate(model, [ids[0].tolist()], 6) == one
    assert torch.allclose(prefill, ref, rtol=1e-4, atol=1e-4)


def test_kv_b_dense_copy_follows_in_place_updates():
    lin = FP8Linear.from_linear(torch.nn.Linear(256, 128, bias=False))
    first = lin.dequantized_weight(torch.float32)
    assert lin.dequantized_weight(torch.float32) is first  # kept
    with torch.no_grad():
        lin.weight_scale_inv.mul_(2)
    assert torch.equal(lin.dequantized_weight(torch.float32), first * 2)


# ---- dsv2 init, the small preset end to end ------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    assert main(["init", "--preset", "small", "--out", str(root / "bf16"), "--max-shard-size", "8MB"]) == 0
    assert main(["init", "--preset", "small", "--out", str(root / "fp8"), "--dtype", "fp8"]) == 0
    return root


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("init_tiny")
    for dtype in ("bf16", "fp8"):
        init_checkpoint(ModelConfig.from_preset("tiny"), root / dtype, fp8=dtype == "fp8", seed=3)
    return root


def test_init_small_loads_and_generates(small_ckpts):
    cfg = ModelConfig.from_preset("small")
    files = json.loads((small_ckpts / "bf16" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(files.values())) > 1  # sharded
    dense = load_checkpoint(small_ckpts / "bf16")
    assert dense.config == cfg and dense.model.embed_tokens.weight.dtype == torch.bfloat16
    w = dense.model.layers[2].mlp.experts.w13.float()
    assert abs(w.std().item() - cfg.initializer_range) < 1e-3 and abs(w.mean().item()) < 1e-4
    assert torch.equal(dense.model.norm.weight, torch.ones(cfg.hidden_size, dtype=torch.bfloat16))
    model = load_checkpoint(small_ckpts / "fp8")
    assert is_fp8(model)
    prompts = [[5, 6, 7, 8], [9, 10]]
    out = generate(model, prompts, 8)
    assert [len(o) for o in out] == [8, 8]
    with torch.no_grad():  # FP8 of the same weights: next-token distributions close to bf16's
        a = dense(torch.tensor([prompts[0]])).float().log_softmax(-1)
        b = model(torch.tensor([prompts[0]])).float().log_softmax(-1)
    assert (a.exp() * (a - b)).sum(-1).max().item() < 0.01


def test_init_never_replaces_a_checkpoint(small_ckpts, capsys):
    before = (small_ckpts / "fp8" / "config.json").read_text()
    assert main(["init", "--preset", "tiny", "--out", str(small_ckpts / "fp8")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (small_ckpts / "fp8" / "config.json").read_text() == before


def test_init_fp8_equals_quantize_of_init_bf16(tiny_ckpts, tmp_path):
    quantize_checkpoint(tiny_ckpts / "bf16", tmp_path / "q", max_shard_size="64KB")
    assert len(list((tmp_path / "q").glob("*.safetensors"))) > 1
    a, b = load_checkpoint(tiny_ckpts / "fp8").state_dict(), load_checkpoint(tmp_path / "q").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(_u8(a[k]), _u8(b[k])) for k in a)


# ---- loading that fits -----------------------------------------------------------------------------------------
def test_memory_check_refuses_with_the_options(tiny_ckpts, monkeypatch, capsys):
    cfg = ModelConfig.from_preset("tiny")
    need_bf16, need_fp8 = ckpt.weights_nbytes(cfg), ckpt.weights_nbytes(cfg, fp8=True)
    assert need_fp8 < 0.7 * need_bf16
    largest = 4 * cfg.vocab_size * cfg.hidden_size  # the embedding, read and converted in float32 before held
    free = (need_fp8 + need_bf16) // 2 + largest
    monkeypatch.setattr(ckpt, "available_memory", lambda device="cpu": free)
    with pytest.raises(CheckpointError, match=r"need .* but cpu has .* free; load them as FP8 .*smaller preset"):
        load_checkpoint(tiny_ckpts / "bf16")
    load_checkpoint(tiny_ckpts / "bf16", fp8=True)  # FP8 fits
    with pytest.raises(CheckpointError, match=r"FP8 .* or bf16 .*--dtype bfloat16"):  # float32 suggests bf16 too
        load_checkpoint(tiny_ckpts / "bf16", dtype=torch.float32)
    train_tokenizer(["def f(x):\n    return x + 1\n" * 50], vocab_size=300, out_dir=tiny_ckpts / "tok")
    assert main(["generate", "--model", str(tiny_ckpts / "bf16"), "--prompt", "x", "--tokenizer",
                 str(tiny_ckpts / "tok")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "FP8" in err
    monkeypatch.setattr(ckpt, "available_memory", lambda device="cpu": 2 * need_bf16)
    load_checkpoint(tiny_ckpts / "bf16")


def test_load_quantizes_each_weight_once_and_keeps_no_mapping(tiny_ckpts, monkeypatch):
    calls = []
    real = fp8.quantize_fp8_blockwise
    monkeypatch.setattr(fp8, "quantize_fp8_blockwise", lambda w, *a: calls.append(w.shape) or real(w, *a))
    model = load_checkpoint(tiny_ckpts / "bf16", fp8=True)
    n_fp8 = sum(1 for m in model.modules() if isinstance(m, FP8Linear))
    n_fp8 += sum(3 * m.w13.shape[0] for m in model.modules() if isinstance(m, FP8RoutedExperts))  # gate, up, down
    assert len(calls) == n_fp8
    with open("/proc/self/maps") as f:  # this load's files only: other tests' oracles may still map theirs
        assert not [line for line in f if str(tiny_ckpts) in line and ".safetensors" in line]


def test_streamed_write_holds_one_tensor_at_a_time(tmp_path):
    """stream_checkpoint asks for each tensor after the previous one was written and dropped."""
    cfg = ModelConfig.from_preset("tiny")
    live: list[weakref.ref] = []

    def read(name):
        assert all(r() is None for r in live), "an earlier tensor is still alive"
        t = torch.randn(source[name][1]).to(torch.bfloat16)
        live.append(weakref.ref(t))
        return t

    from dsv2.checkpoint import hf_tensors

    with torch.device("meta"):
        source = {k: (torch.bfloat16, tuple(t.shape)) for k, t in hf_tensors(DeepseekV2(cfg))}
    ckpt.stream_checkpoint(tmp_path / "c", cfg, source, read, fp8=True, max_shard_size="100KB")
    assert len(live) == len(source) and is_fp8(load_checkpoint(tmp_path / "c"))


def test_quantize_refuses_an_fp8_checkpoint(tiny_ckpts, tmp_path):
    with pytest.raises(CheckpointError, match="already an FP8"):
        quantize_checkpoint(tiny_ckpts / "fp8", tmp_path / "x")


def test_auto_dtype_bf16_on_avx2_cpus(monkeypatch):
    from dsv2.infer.cli import auto_dtype

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert auto_dtype("cpu") == torch.bfloat16 and auto_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert auto_dtype("cpu") == torch.float32


def test_fp8_linear_fallback_is_dequantize_then_linear(monkeypatch):
    monkeypatch.setattr(fp8_cpu, "_lib", False)
    w = torch.randn(200, 300) * 0.05
    q, s = quantize_fp8_blockwise(w)
    x = torch.randn(2, 3, 300)
    assert torch.equal(fp8_linear(x, q, s), F.linear(x, fp8.dequantize_fp8_blockwise(q, s, dtype=torch.float32)))
