"""RoPE on interleaved pairs and YaRN with DeepSeek-V2's reference semantics.

The expected values are computed here independently of dsv2/model/rope.py: scalar Python in float64, the
frequencies through each pair's wavelength and rotation count (the YaRN paper's view), the correction range as
the pair index where the rotation count equals beta (solved with a logarithm in that base), and the mscale as
1 + ln(s) * m / 10. Nothing is imported from rope.py except what is under test.
"""

import math

import pytest
import torch

from dsv2.config import ModelConfig, yarn_scaling
from dsv2.model.rope import RotaryEmbedding, apply_rope, rope_frequencies, softmax_scale


def _mscale(s: float, m: float) -> float:
    return 1.0 if s <= 1 else 1.0 + math.log(s) * m / 10


def reference_yarn(d: int, base: float, factor: float, orig: int, beta_fast: float, beta_slow: float) -> list[float]:
    """Per pair i: theta_i = base^(-2i/d), wavelength 2 pi / theta_i, rotations r_i = orig / wavelength.
    DeepSeek places the ramp between the (fractional) pair indices where r = beta_fast and r = beta_slow, rounded
    outwards and clamped to [0, d - 1]; the weight of the interpolated (theta / factor) frequency grows linearly
    in the pair index across that range."""
    def pair_index_with_rotations(b: float) -> float:  # solve orig * base^(-2i/d) / (2 pi) = b for i
        return d / 2 * math.log(orig / (2 * math.pi * b), base)

    lo = max(math.floor(pair_index_with_rotations(beta_fast)), 0)
    hi = min(math.ceil(pair_index_with_rotations(beta_slow)), d - 1)
    if hi == lo:
        hi += 0.001
    out = []
    for i in range(d // 2):
        theta = base ** (-2 * i / d)
        w_inter = min(1.0, max(0.0, (i - lo) / (hi - lo)))
        out.append(theta / factor * w_inter + theta * (1 - w_inter))
    return out


YARN_CASES = {  # name: (qk_rope_head_dim, rope_theta, factor, original_max, beta_fast, beta_slow)
    "v2_factor40": (64, 10000.0, 40.0, 4096, 32.0, 1.0),
    "factor4": (64, 10000.0, 4.0, 4096, 32.0, 1.0),
    "factor8_short": (64, 10000.0, 8.0, 64, 32.0, 1.0),
    "tiny_dim8": (8, 10000.0, 8.0, 64, 32.0, 1.0),
    "empty_range": (8, 10000.0, 4.0, 4, 32.0, 1.0),  # both correction dims round to 0: high += 0.001
    "clamped_high": (8, 100.0, 40.0, 32768, 32.0, 1.0),  # upper correction dim past d - 1
    "other_betas": (64, 10000.0, 16.0, 2048, 16.0, 2.0),
}


def _cfg(d=64, base=10000.0, **rope_scaling) -> ModelConfig:
    return ModelConfig.from_preset("tiny", qk_rope_head_dim=d, rope_theta=base,
                                   rope_scaling=rope_scaling or None)


@pytest.mark.parametrize("name", list(YARN_CASES))
def test_yarn_frequencies_match_independent_formulation(name):
    d, base, factor, orig, bf, bs = YARN_CASES[name]
    cfg = _cfg(d, base, type="yarn", factor=factor, original_max_position_embeddings=orig, beta_fast=bf,
               beta_slow=bs)
    inv, _ = rope_frequencies(cfg)
    want = reference_yarn(d, base, factor, orig, bf, bs)
    assert inv.shape == (d // 2,)
    for i, (got, w) in enumerate(zip(inv.tolist(), want)):
        assert abs(got - w) <= 2e-6 * w, (i, got, w)


@pytest.mark.parametrize("factor", [4.0, 8.0, 40.0])
def test_yarn_keeps_fast_pairs_and_interpolates_slow_ones(factor):
    """The YaRN paper's rule, independent of DeepSeek's rounding: pairs turning more than beta_fast times within
    the original context are not changed; pairs turning less than beta_slow times are divided by the factor."""
    d, base, orig = 64, 10000.0, 4096
    inv, _ = rope_frequencies(_cfg(d, base, **yarn_scaling(factor=factor, original_max=orig)))
    kept = divided = 0
    for i in range(d // 2):
        theta = base ** (-2 * i / d)
        rotations = orig / (2 * math.pi / theta)
        if rotations > 32:
            assert inv[i].item() == pytest.approx(theta, rel=1e-6)
            kept += 1
        elif rotations < 1:
            assert inv[i].item() == pytest.approx(theta / factor, rel=1e-6)
            divided += 1
        else:
            assert theta / factor * (1 - 1e-6) <= inv[i].item() <= theta * (1 + 1e-6)
    assert kept >= 8 and divided >= 8  # both regimes are exercised
    assert inv.diff().le(0).all()


def test_no_rope_scaling_is_plain_rope():
    inv, m = rope_frequencies(_cfg(16))
    assert m == 1.0
    assert inv.tolist() == pytest.approx([10000.0 ** (-2 * i / 16) for i in range(8)], rel=1e-6)


# (rope_scaling keys beyond type/factor; missing means absent) -> expected cos/sin multiplier and softmax factor
MSCALE_CASES = {
    "v2_equal": (40.0, dict(mscale=0.707, mscale_all_dim=0.707), 1.0, _mscale(40, 0.707) ** 2),
    "differ": (8.0, dict(mscale=1.0, mscale_all_dim=0.5), _mscale(8, 1.0) / _mscale(8, 0.5), _mscale(8, 0.5) ** 2),
    "mscale_zero": (40.0, dict(mscale=0.0, mscale_all_dim=0.707), 1 / _mscale(40, 0.707), _mscale(40, 0.707) ** 2),
    "all_dim_absent": (4.0, dict(mscale=0.707), _mscale(4, 0.707), 1.0),
    "both_absent": (4.0, dict(), _mscale(4, 1.0), 1.0),  # the reference's defaults: mscale 1, mscale_all_dim 0
    "mscale_absent": (8.0, dict(mscale_all_dim=1.0), _mscale(8, 1.0) / _mscale(8, 1.0), _mscale(8, 1.0) ** 2),
    "all_dim_zero": (40.0, dict(mscale=0.707, mscale_all_dim=0.0), _mscale(40, 0.707), 1.0),
    "all_dim_null": (40.0, dict(mscale=0.707, mscale_all_dim=None), _mscale(40, 0.707), 1.0),
    "factor_one": (1.0, dict(mscale=0.707, mscale_all_dim=0.707), 1.0, 1.0),
}


@pytest.mark.parametrize("name", list(MSCALE_CASES))
def test_yarn_mscale_on_cos_sin_and_softmax(name):
    factor, keys, want_cos, want_softmax = MSCALE_CASES[name]
    cfg = _cfg(type="yarn", factor=factor, original_max_position_embeddings=64, **keys)
    _, m = rope_frequencies(cfg)
    assert m == pytest.approx(want_cos, rel=1e-12)
    assert softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim ** -0.5 * want_softmax, rel=1e-12)


def test_v2_softmax_scale_is_about_1_59_times_plain():
    cfg = ModelConfig.from_preset("v2")
    assert softmax_scale(cfg) * 192 ** 0.5 == pytest.approx(1.5897, abs=1e-3)
    plain = ModelConfig.from_preset("tiny")
    assert softmax_scale(plain) == plain.qk_head_dim ** -0.5


def test_softmax_mscale_applies_for_any_rope_scaling_type_with_mscale_all_dim():
    """DeepSeek's reference checks `rope_scaling is not None`, not the type, before the softmax mscale^2."""
    cfg = _cfg(type="default", factor=40.0, mscale_all_dim=0.707)
    assert softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim ** -0.5 * _mscale(40, 0.707) ** 2, rel=1e-12)
    inv, m = rope_frequencies(cfg)  # the frequencies change only under yarn
    assert m == 1.0 and inv.tolist() == pytest.approx([10000.0 ** (-2 * i / 64) for i in range(32)], rel=1e-6)


def test_rotary_tables_are_scaled_cos_sin_of_position_times_frequency():
    d, base, factor, orig = 8, 10000.0, 8.0, 64
    cfg = _cfg(d, base, type="yarn", factor=factor, original_max_position_embeddings=orig, mscale=1.0,
               mscale_all_dim=0.5)
    want_inv = reference_yarn(d, base, factor, orig, 32.0, 1.0)
    m = _mscale(factor, 1.0) / _mscale(factor, 0.5)
    positions = [0, 1, 7, 63, 500]
    cos, sin = RotaryEmbedding(cfg)(torch.tensor([positions]))
    for t, p in enumerate(positions):
        for i, f in enumerate(want_inv):
            assert cos[0, t, i].item() == pytest.approx(m * math.cos(p * f), abs=1e-5)
            assert sin[0, t, i].item() == pytest.approx(m * math.sin(p * f), abs=1e-5)


def test_apply_rope_rotates_each_interleaved_pair():
    x = torch.randn(2, 5, 3, 8)
    cos, sin = RotaryEmbedding(ModelConfig.from_preset("tiny"))(torch.arange(5)[None].expand(2, 5))
    out = apply_rope(x, cos, sin)
    for b, t, h, i in [(0, 0, 0, 0), (1, 4, 2, 3), (0, 3, 1, 1), (1, 2, 0, 2)]:
        a, c = x[b, t, h, 2 * i].item(), x[b, t, h, 2 * i + 1].item()
        co, si = cos[b, t, i].item(), sin[b, t, i].item()
        assert out[b, t, h, 2 * i].item() == pytest.approx(a * co - c * si, abs=1e-6)
        assert out[b, t, h, 2 * i + 1].item() == pytest.approx(a * si + c * co, abs=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    cfg = ModelConfig.from_preset("tiny")
    q, k = torch.randn(8), torch.randn(8)
    rope = RotaryEmbedding(cfg)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return (apply_rope(q[None, None], cq, sq) * apply_rope(k[None, None], ck, sk)).sum().item()

    assert score(10, 3) == pytest.approx(score(107, 100), abs=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)
