"""RoPE on interleaved pairs and YaRN with DeepSeek's semantics, checked against the formulas themselves."""

import math

import torch

from dsv2.config import ModelConfig, yarn_scaling
from dsv2.model.rope import RotaryEmbedding, apply_rope, rope_frequencies, softmax_scale, yarn_get_mscale


def test_apply_rope_is_complex_multiplication_on_pairs():
    x = torch.randn(2, 5, 3, 8)
    pos = torch.arange(5)[None].expand(2, 5)
    cos, sin = RotaryEmbedding(ModelConfig.from_preset("tiny"))(pos)
    z = torch.view_as_complex(x.view(2, 5, 3, 4, 2))
    rot = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[:, :, None]
    assert torch.allclose(apply_rope(x, cos, sin), torch.view_as_real(z * rot).flatten(-2), atol=1e-6)


def test_yarn_frequencies_follow_the_formula():
    d, base, factor, orig, bf, bs = 64, 10000.0, 40.0, 4096, 32.0, 1.0
    cfg = ModelConfig.from_preset("v2")
    inv, m = rope_frequencies(cfg)
    extra = [1 / base ** (2 * i / d) for i in range(d // 2)]
    dim = lambda rot: d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(math.floor(dim(bf)), 0), min(math.ceil(dim(bs)), d - 1)
    for i in range(d // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        want = extra[i] / factor * ramp + extra[i] * (1 - ramp)
        assert abs(inv[i].item() - want) <= 1e-6 * want
    assert m == 1.0  # mscale == mscale_all_dim for V2


def test_softmax_scale_has_mscale_squared():
    cfg = ModelConfig.from_preset("v2")
    m = 0.1 * 0.707 * math.log(40) + 1
    assert abs(softmax_scale(cfg) - 192 ** -0.5 * m * m) < 1e-12
    assert abs(m * m - 1.5897) < 1e-3  # "about 1.59 for V2"
    plain = ModelConfig.from_preset("tiny")
    assert softmax_scale(plain) == plain.qk_head_dim ** -0.5
    assert yarn_get_mscale(1.0, 0.707) == 1.0


def test_cos_sin_scaled_when_mscales_differ():
    cfg = ModelConfig.from_preset("tiny", rope_scaling=yarn_scaling(factor=8.0, original_max=64, mscale=1.0,
                                                                     mscale_all_dim=0.5))
    _, m = rope_frequencies(cfg)
    assert abs(m - yarn_get_mscale(8, 1.0) / yarn_get_mscale(8, 0.5)) < 1e-12
