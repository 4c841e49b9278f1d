"""Tests for dsv2.model.fp8: FP8 128x128 block-scaled weights (DeepSeek's FP8 checkpoint layout), FP8Linear,
FP8 expert stacks and whole-model conversion.

References are computed independently of the code under test: `_loop_dequant` writes the published formula
W = weight.float() * weight_scale_inv one 128x128 block at a time, and error bounds come from e4m3 itself.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsv2.model.fp8 as fp8
from dsv2.model import fp8_cpu
from dsv2 import DeepseekV2, ModelConfig
from dsv2.model.fp8 import (
    FP8_DTYPE,
    FP8Linear,
    FP8RoutedExperts,
    convert_model_fp8,
    dequantize_fp8_blockwise,
    fp8_linear_nbytes,
    fp8_to_float32,
    is_fp8,
    quantize_fp8_blockwise,
    weight_nbytes,
)

# e4m3 has 3 mantissa bits: round-to-nearest errs by at most 2^-4 relative for normal numbers; below the
# smallest normal (2^-6 in quantized units) the grid step is 2^-9, so the absolute error is at most 2^-10.
E4M3_REL = 2.0**-4
E4M3_SUBNORMAL_ABS = 2.0**-10


def _loop_dequant(w_fp8, scale_inv, block=128):
    """The published formula written plainly, one block at a time, float32 (leading dims: one matrix each)."""
    if w_fp8.dim() > 2:
        return torch.stack([_loop_dequant(w, s, block) for w, s in zip(w_fp8, scale_inv)])
    out = torch.empty(w_fp8.shape, dtype=torch.float32)
    rows, cols = w_fp8.shape
    assert scale_inv.shape == (math.ceil(rows / block), math.ceil(cols / block))
    for i in range(math.ceil(rows / block)):
        for j in range(math.ceil(cols / block)):
            blk = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            out[blk] = w_fp8[blk].float() * scale_inv[i, j]
    return out


def _loop_dequant_experts(experts):
    """w13 [E, 2I, H], w2 [E, H, I] from FP8 expert stacks, as the per-expert checkpoint tensors define them:
    gate_proj and up_proj each have their own block rows (w13_scale_inv = gate's block rows, then up's)."""
    I, rb = experts.w13.shape[1] // 2, math.ceil(experts.w13.shape[1] // 2 / 128)
    w13, s13 = experts.w13, experts.w13_scale_inv
    gate, up = _loop_dequant(w13[:, :I], s13[:, :rb]), _loop_dequant(w13[:, I:], s13[:, rb:])
    return torch.cat([gate, up], dim=1), _loop_dequant(experts.w2, experts.w2_scale_inv)


def _block_expand(scale_inv, shape, block=128):  # [..., R, C] -> [..., rows, cols]
    return scale_inv.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., : shape[-2], : shape[-1]]


def _e4m3_bound(w):
    """Largest error e4m3 block quantization may make on each element of w (per-block amax computed here)."""
    rows, cols = w.shape[-2:]
    amax = torch.zeros(*w.shape[:-2], math.ceil(rows / 128), math.ceil(cols / 128))
    for i in range(amax.shape[-2]):
        for j in range(amax.shape[-1]):
            amax[..., i, j] = w[..., i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].abs().amax(dim=(-2, -1))
    scale = _block_expand(amax / 448.0, w.shape)
    return E4M3_REL * w.abs() + (E4M3_SUBNORMAL_ABS + 1e-6) * scale


# ---- block quantization --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (3, 200, 300), (5, 7)])
def test_fp8_blockwise_roundtrip_error_bounds(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[-1])  # mixed magnitudes inside every block
    q, s = quantize_fp8_blockwise(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.dtype == torch.float32
    assert s.shape == (*shape[:-2], math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))
    d = dequantize_fp8_blockwise(q, s, dtype=torch.float32)
    assert torch.equal(d, _loop_dequant(q, s))
    err = (d - w).abs()
    assert torch.all(err <= _e4m3_bound(w))  # normal-range rounding or subnormal step, per element
    assert torch.all(err <= E4M3_REL * 448.0 * _block_expand(s, shape))  # at most 2^-4 of the block's amax
    assert (err.norm() / w.norm()).item() < 0.03  # RMS far below the worst case


def test_fp8_scale_layout_matches_published_format():
    # Block (1, 2) is 1000x larger than the rest: only scale_inv[1, 2] may see it.
    torch.manual_seed(1)
    w = torch.rand(200, 300) * 2 - 1
    w[128:, 256:] *= 1000
    w[0, 0] = 1.0  # pin block (0, 0)'s amax
    q, s = quantize_fp8_blockwise(w)
    assert s.shape == (2, 3)
    assert s[1, 2] > 500 * s[1, 1]
    assert torch.isclose(s[0, 0], torch.tensor(1.0 / 448))
    assert torch.equal(q[0, 0].float(), torch.tensor(448.0))  # block amax maps to the top of e4m3
    # Vectorised dequantization equals the plain per-block formula exactly.
    assert torch.equal(dequantize_fp8_blockwise(q, s, dtype=torch.float32), _loop_dequant(q, s))
    # Default output dtype is bf16: the float32 product, rounded once.
    assert torch.equal(dequantize_fp8_blockwise(q, s), _loop_dequant(q, s).bfloat16())


def test_fp8_stacked_experts_match_per_expert():
    torch.manual_seed(2)
    w = torch.randn(4, 200, 130)
    q, s = quantize_fp8_blockwise(w)
    assert s.shape == (4, 2, 2)
    for e in range(4):
        qe, se = quantize_fp8_blockwise(w[e])
        assert torch.equal(q[e].view(torch.uint8), qe.view(torch.uint8)) and torch.equal(s[e], se)
    d = dequantize_fp8_blockwise(q, s, dtype=torch.float32)
    assert torch.equal(d[3], _loop_dequant(q[3], s[3]))


def test_fp8_zero_block_and_bad_scale_shape():
    w = torch.randn(256, 256)
    w[:128, 128:] = 0
    q, s = quantize_fp8_blockwise(w)
    assert s[0, 1] == 1.0 and torch.isfinite(s).all()
    d = dequantize_fp8_blockwise(q, s, dtype=torch.float32)
    assert torch.all(d[:128, 128:] == 0) and torch.isfinite(d).all()
    with pytest.raises(ValueError, match="expected"):
        dequantize_fp8_blockwise(q, s[:, :1])


def test_fp8_table_conversion_is_exact():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)  # every e4m3 value, NaNs included
    assert torch.equal(fp8_to_float32(codes).nan_to_num(7.0), codes.float().nan_to_num(7.0))
    w = torch.randn(4, 6, 10).to(torch.float8_e4m3fn)[:, 1:5]  # non-contiguous
    assert torch.equal(fp8_to_float32(w), w.float())


# ---- FP8Linear -----------------------------------------------------------------------------------------------
def test_fp8_linear_matches_dequantized_and_full_precision():
    torch.manual_seed(3)
    lin = nn.Linear(300, 200, bias=True)
    m = FP8Linear.from_linear(lin)
    x = torch.randn(2, 5, 300)
    w_deq = _loop_dequant(m.weight, m.weight_scale_inv)
    assert torch.allclose(m(x), F.linear(x, w_deq, lin.bias), rtol=1e-5, atol=1e-5)
    # Against full precision: |x W^T - x Wq^T| <= |x| |W - Wq|^T, with |W - Wq| bounded per element by e4m3.
    with torch.no_grad():
        bound = x.abs() @ _e4m3_bound(lin.weight).T
        assert torch.all((m(x) - lin(x)).abs() <= bound + 1e-5)
    xb = x.bfloat16()
    yb = m(xb)
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.float(), F.linear(xb, w_deq.bfloat16(), lin.bias.bfloat16()).float(), rtol=1e-2, atol=1e-2)
    # Row-chunked forward (the dequantize path: kernel off): same numbers up to matmul rounding; chunks round up to
    # whole blocks, so no dequantized copy has more than 128 of the 200 rows.
    m.chunk_rows = 100
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fp8_cpu, "available", lambda: False)
        rows, deq = [], fp8.dequantize_fp8_blockwise
        mp.setattr(fp8, "dequantize_fp8_blockwise", lambda w, *a: rows.append(w.shape[0]) or deq(w, *a))
        assert torch.allclose(m(x), F.linear(x, w_deq, lin.bias), rtol=1e-5, atol=1e-5)
    assert rows == [128, 72]
    assert "float8_e4m3fn" in repr(m) and "block=128x128" in repr(m)


def test_fp8_linear_holds_a_quarter_of_fp32():
    lin = nn.Linear(1024, 768, bias=False)
    m = FP8Linear.from_linear(lin)
    assert {n for n, _ in m.named_buffers()} == {"weight", "weight_scale_inv"}
    assert not any(p.requires_grad for p in m.parameters())
    fp32_bytes = lin.weight.numel() * 4
    assert m.nbytes() == fp8_linear_nbytes(768, 1024) == 768 * 1024 + 4 * 6 * 8
    assert 0.25 <= m.nbytes() / fp32_bytes < 0.2501
    # .to(dtype) must not widen the fp8 weight nor round the float32 scales.
    s = m.weight_scale_inv.clone()
    m.to(torch.bfloat16)
    assert m.weight.dtype == FP8_DTYPE and torch.equal(m.weight_scale_inv, s)


def test_fp8_linear_checkpoint_round_trip_and_from_quantized():
    torch.manual_seed(4)
    m = FP8Linear.from_linear(nn.Linear(300, 200, bias=False))
    sd = m.state_dict()
    assert sd["weight"].dtype == FP8_DTYPE and sd["weight_scale_inv"].shape == (2, 3)
    fresh = FP8Linear(300, 200)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 300)
    assert torch.equal(fresh(x), m(x))
    wrapped = FP8Linear.from_quantized(sd["weight"], sd["weight_scale_inv"])
    assert torch.equal(wrapped(x), m(x))
    with pytest.raises(ValueError):
        FP8Linear.from_quantized(sd["weight"], sd["weight_scale_inv"][:1])


# ---- the whole model -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    dense = DeepseekV2(ModelConfig.from_preset("tiny", initializer_range=0.02)).eval()
    return dense, convert_model_fp8(copy.deepcopy(dense))


def test_conversion_skips_router_and_head():
    net = nn.Module()
    net.layers = nn.ModuleList([nn.ModuleDict({"up_proj": nn.Linear(8, 16), "gate": nn.Linear(8, 4)})])
    net.lm_head = nn.Linear(8, 32)
    convert_model_fp8(net)
    assert isinstance(net.layers[0]["up_proj"], FP8Linear)
    assert type(net.layers[0]["gate"]) is nn.Linear and type(net.lm_head) is nn.Linear


def test_model_conversion_and_dtype_casts(pair):
    dense, model = pair
    assert is_fp8(model) and not is_fp8(dense)
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[1].mlp.gate) is not FP8Linear
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.kv_b_proj, FP8Linear) and isinstance(layer.mlp.experts, FP8RoutedExperts)
    assert isinstance(model.model.layers[0].mlp.down_proj, FP8Linear)  # dense MLP layer
    assert layer.mlp.gate.weight.dtype == torch.float32 and layer.mlp.experts.w13.dtype == FP8_DTYPE
    assert weight_nbytes(model) < 0.5 * weight_nbytes(dense)
    cast = copy.deepcopy(model).to(torch.bfloat16)  # dtype casts leave FP8 storage and scales alone
    experts = cast.model.layers[1].mlp.experts
    assert experts.w13.dtype == FP8_DTYPE and experts.w13_scale_inv.dtype == torch.float32
    assert torch.equal(experts.w13.view(torch.uint8), layer.mlp.experts.w13.view(torch.uint8))
    assert torch.equal(experts.w13_scale_inv, layer.mlp.experts.w13_scale_inv)


def test_expert_stacks_keep_per_projection_blocks(pair):
    """I = 32 here: gate and up rows each get their own (partial) block row, as in the per-expert checkpoint, and
    every dequantized expert is within e4m3's bound of the full-precision one."""
    dense, model = pair
    w13, w2 = dense.model.layers[1].mlp.experts.w13.detach(), dense.model.layers[1].mlp.experts.w2.detach()
    experts = model.model.layers[1].mlp.experts
    E, two_i, H = w13.shape
    assert experts.w13_scale_inv.shape == (E, 2, 1) and experts.w2_scale_inv.shape == (E, 1, 1)
    d13, d2 = _loop_dequant_experts(experts)
    I = two_i // 2
    assert torch.all((d13[:, :I] - w13[:, :I]).abs() <= _e4m3_bound(w13[:, :I]))
    assert torch.all((d13[:, I:] - w13[:, I:]).abs() <= _e4m3_bound(w13[:, I:]))
    assert torch.all((d2 - w2).abs() <= _e4m3_bound(w2))


@pytest.mark.parametrize("kernel", [False, True], ids=["dequantize", "cpu-kernel"])
def test_experts_compute_with_dequantized_weights_of_active_experts_only(pair, monkeypatch, kernel):
    """Without the CPU kernel only the experts with rows are dequantized; with it nothing is (the kernel reads the
    FP8 bytes); both compute SwiGLU with the independently dequantized weights."""
    if kernel and not fp8_cpu.available():
        pytest.skip("the FP8 CPU kernel cannot be built here (no C compiler or no AVX2/F16C)")
    if not kernel:
        monkeypatch.setattr(fp8_cpu, "_lib", False)
    _, model = pair
    experts = model.model.layers[1].mlp.experts
    E, two_i, H = experts.w13.shape
    counts = torch.zeros(E, dtype=torch.long)
    counts[[1, 4]] = torch.tensor([3, 2])
    torch.manual_seed(5)
    x, w = torch.randn(5, H), torch.rand(5)
    deq = []  # elements dequantized, by any path

    def spy(q, s, *a, **k):
        deq.append(q.numel())
        return dequantize_fp8_blockwise(q, s, *a, **k)

    monkeypatch.setattr(fp8, "dequantize_fp8_blockwise", spy)
    got = experts(x, counts, w)
    # without the kernel: experts 1 and 4, nothing else
    assert sum(deq) == (0 if kernel else 2 * (experts.w13[0].numel() + experts.w2[0].numel()))
    # reference: SwiGLU per expert with the independently dequantized weights
    w13, w2 = _loop_dequant_experts(experts)
    ref = []
    for e, rows in ((1, slice(0, 3)), (4, slice(3, 5))):
        g, u = (x[rows] @ w13[e].T).chunk(2, dim=-1)
        ref.append((F.silu(g) * u * w[rows, None]) @ w2[e].T)
    assert torch.allclose(got, torch.cat(ref), rtol=1e-5, atol=1e-6)


def test_fp8_model_equals_model_with_dequantized_weights(pair):
    """The FP8 model computes exactly what a full-precision model holding the dequantized weights computes, and
    stays within a fixed tolerance of the original: relative RMS logit error below 2^-4, the worst relative error
    e4m3 rounding makes on one weight (a float32 model at init std 0.02 measures about 0.04)."""
    dense, model = pair
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, FP8Linear):
                ref.get_submodule(name).weight.copy_(_loop_dequant(mod.weight, mod.weight_scale_inv))
            elif isinstance(mod, FP8RoutedExperts):
                w13, w2 = _loop_dequant_experts(mod)
                ref.get_submodule(name).w13.copy_(w13)
                ref.get_submodule(name).w2.copy_(w2)
        ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(6))
        got, want, orig = model(ids), ref(ids), dense(ids)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert ((got - orig).norm() / orig.norm()).item() < E4M3_REL


# ---- the GPU FP8 matmul (torch._scaled_mm with block scales), its CPU-checkable parts -----------------------
def test_activation_quantization_is_per_token_and_128_channels():
    """Independent of the code: each (row, 128-channel block) maps its largest magnitude to exactly +-448, every
    element comes back within e4m3's rounding, and blocks do not share scales (a huge block leaves its neighbour
    intact)."""
    torch.manual_seed(0)
    x = torch.randn(5, 384) * torch.tensor([1e-3, 1.0, 30.0]).repeat_interleave(128)
    x[2, 128:256] *= 1e4  # one loud block
    x[3, :128] = 0  # an all-zero block
    q, s = fp8.quantize_activations(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and s.shape == (5, 3) and s.dtype == torch.float32
    for m in range(5):
        for c in range(3):
            blk, qb = x[m, 128 * c:128 * (c + 1)], q[m, 128 * c:128 * (c + 1)].float()
            if blk.abs().max() == 0:
                assert s[m, c] == 1 and torch.all(qb == 0)
                continue
            assert qb.abs().max() == 448
            back = qb * s[m, c]
            err = (back - blk).abs()
            assert torch.all(err <= E4M3_REL * blk.abs() + E4M3_SUBNORMAL_ABS * s[m, c] + 1e-12)
    assert s[2, 0] == x[2, :128].abs().max() / 448  # untouched by the loud block beside it


def _emulated_scaled_mm(a, b, *, scale_a, scale_b, out_dtype):
    """torch._scaled_mm's documented block-scaled contract (as PyTorch's own test emulates it), checking the
    layouts cuBLAS requires: a [M, K] fp8 row-major with M % 16 == 0, scale_a [M, K/128] outer-dim-major (1x128
    blocks); b [K, N] fp8 column-major, scale_b [K/128, N/128] (128x128 blocks)."""
    M, K = a.shape
    N = b.shape[1]
    assert a.dtype == b.dtype == FP8_DTYPE and M % 16 == 0 and a.stride(1) == 1 and b.stride(0) == 1
    assert scale_a.shape == (M, K // 128) and scale_a.stride(0) == 1
    assert scale_b.shape == (K // 128, math.ceil(N / 128))
    af = a.float() * scale_a.repeat_interleave(128, dim=1)
    bf = b.float() * scale_b.repeat_interleave(128, dim=0).repeat_interleave(128, dim=1)[:, :N]
    return (af @ bf).to(out_dtype)


@pytest.mark.parametrize("rows", [1, 7, 16, 33])
def test_fp8_scaled_mm_passes_the_block_layouts_and_matches_the_dequantized_product(monkeypatch, rows):
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_scaled_mm)
    torch.manual_seed(1)
    lin = nn.Linear(384, 208, bias=True)  # N not a multiple of 128: a partial block column of scales
    m = FP8Linear.from_linear(lin)
    x = torch.randn(rows, 384)
    y = fp8.fp8_scaled_mm(x.view(1, rows, 384), m.weight, m.weight_scale_inv, m.bias)
    assert y.shape == (1, rows, 208)
    ref = F.linear(x, _loop_dequant(m.weight, m.weight_scale_inv), lin.bias)
    # The only difference is the activations' own e4m3 rounding: |dx| <= 2^-4 |x| (+ subnormal floor) per element.
    xq, xs = fp8.quantize_activations(x)
    dx_bound = E4M3_REL * x.abs() + E4M3_SUBNORMAL_ABS * xs.repeat_interleave(128, dim=1)
    bound = dx_bound @ _loop_dequant(m.weight, m.weight_scale_inv).abs().T
    assert torch.all((y[0] - ref).abs() <= bound + 1e-4)
    assert (y[0] - ref).abs().max() > 0  # the activations really were quantized


def test_fp8_linear_uses_scaled_mm_where_it_runs_and_falls_back_once_where_refused(monkeypatch):
    """The dispatch, on CPU with the CPU kernel off: a device whose first call succeeds keeps the FP8 product; one
    whose first call is refused warns once and dequantizes from then on."""
    monkeypatch.setattr(fp8_cpu, "available", lambda: False)
    monkeypatch.setattr(fp8, "_SCALED_MM", {})
    monkeypatch.setattr(fp8, "_scaled_mm_state", lambda x, w, b: fp8._SCALED_MM.get((x.device.type, x.device.index)))
    torch.manual_seed(2)
    m = FP8Linear.from_linear(nn.Linear(256, 128, bias=False))
    x = torch.randn(3, 256)
    dense = F.linear(x, _loop_dequant(m.weight, m.weight_scale_inv))
    calls = []

    def ok(*a, **k):
        calls.append(1)
        return _emulated_scaled_mm(*a, **k)

    monkeypatch.setattr(torch, "_scaled_mm", ok)
    y = m(x)
    assert calls and fp8._SCALED_MM[("cpu", None)] is True and not torch.equal(y, dense)

    def refuse(*a, **k):
        calls.append(0)
        raise RuntimeError("Invalid scaling configuration")

    monkeypatch.setattr(fp8, "_SCALED_MM", {})
    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    with pytest.warns(UserWarning, match="dequantized per call"):
        y = m(x)
    assert fp8._SCALED_MM[("cpu", None)] is False and torch.allclose(y, dense, atol=1e-5)
    n = len(calls)
    assert torch.allclose(m(x), dense, atol=1e-5) and len(calls) == n  # never asked again


def test_scaled_mm_is_not_tried_on_cpu_or_for_unfit_shapes():
    w = torch.zeros(128, 256, dtype=FP8_DTYPE)
    x = torch.randn(2, 256)
    assert fp8._scaled_mm_fits(x, w, 128)
    assert fp8._scaled_mm_state(x, w, 128) is False  # CPU: the kernel or dequantize
    assert not fp8._scaled_mm_fits(torch.randn(2, 200), torch.zeros(128, 200, dtype=FP8_DTYPE), 128)  # K % 128
    assert not fp8._scaled_mm_fits(x, torch.zeros(120, 256, dtype=FP8_DTYPE), 128)  # N % 16
    assert not fp8._scaled_mm_fits(x, w, 64)  # other blocks
    assert not fp8._scaled_mm_fits(x.half(), w, 128)
    assert not fp8._scaled_mm_fits(x.requires_grad_(), w, 128)  # no backward through it
