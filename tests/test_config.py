"""ModelConfig presets, validation, and config.json round trips (with transformers' DeepseekV2Config)."""

import pytest
from transformers import DeepseekV2Config

from dsv2.config import PRESETS, ModelConfig


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_hf(name):
    cfg = ModelConfig.from_preset(name)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    hf = DeepseekV2Config(**{k: v for k, v in cfg.to_hf().items() if k != "model_type"})
    assert ModelConfig.from_hf(hf.to_dict()) == cfg


def test_v2_preset_matches_design():
    c = ModelConfig.from_preset("v2")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank) == (
        5120, 60, 128, 1536, 512)
    assert (c.n_shared_experts, c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (2, 160, 6, 8, 3)
    assert c.rope_scaling["factor"] == 40 and c.rope_scaling["mscale_all_dim"] == 0.707
    assert c.kv_cache_dim == 576 and c.routed_scaling_factor == 16.0


def test_validation_errors_are_clear():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match="divisible by n_group"):
        ModelConfig.from_preset("tiny", n_group=3)
    with pytest.raises(ValueError, match="topk_method"):
        ModelConfig.from_preset("tiny", topk_method="random")
    with pytest.raises(ValueError, match="hidden_act 'tanhshrink' is not one of silu, swish, gelu"):
        ModelConfig.from_preset("tiny", hidden_act="tanhshrink")
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf({"model_type": "gpt2"})
