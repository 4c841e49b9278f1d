"""Logits of dsv2 vs transformers' DeepseekV2ForCausalLM on identical weights, checkpoints both ways."""

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from dsv2 import DeepseekV2, ModelConfig, load_checkpoint, save_checkpoint
from dsv2.config import yarn_scaling
from oracle import oracle_from_dsv2, patch_oracle

CONFIGS = {
    "default": {},  # q_lora on, group-limited routing, dense first layer
    "no_q_lora_greedy": dict(q_lora_rank=None, topk_method="greedy", n_group=None, topk_group=None),
    "scaled_all_moe": dict(routed_scaling_factor=2.5, first_k_dense_replace=0),
    "norm_topk": dict(norm_topk_prob=True, num_experts_per_tok=3),
    "yarn": dict(rope_scaling=yarn_scaling(factor=4.0, original_max=32), max_position_embeddings=128),
    "two_dense_layers": dict(first_k_dense_replace=2, n_shared_experts=2, routed_scaling_factor=16.0),
    # the q/kv latent norms keep eps 1e-6 whatever rms_norm_eps says (DeepSeek's reference, and transformers)
    "large_rms_norm_eps": dict(rms_norm_eps=0.1),
    # hidden_act reaches every MLP and expert (it was once silu whatever the config said)
    "gelu": dict(hidden_act="gelu"),
    "relu_shared_and_dense": dict(hidden_act="relu", n_shared_experts=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    cfg = ModelConfig.from_preset("tiny", initializer_range=0.1, **CONFIGS[name])
    model = DeepseekV2(cfg).eval()
    hf = oracle_from_dsv2(model, tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert (ours - ref).abs().max() < 1e-4
    assert ours.abs().max() > 0.1  # a real signal, not two near-zero tensors


def test_oracle_deviations_are_real(tmp_path):
    """Unpatched transformers differs where DESIGN says it does; our patch is what closes the gap."""
    cfg = ModelConfig.from_preset("tiny", initializer_range=0.1, norm_topk_prob=True, num_experts_per_tok=3,
                                  rope_scaling=yarn_scaling(factor=4.0, original_max=32))
    model = DeepseekV2(cfg).eval()
    hf = oracle_from_dsv2(model, tmp_path, patch=False)
    ids = torch.randint(0, cfg.vocab_size, (1, 32))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() > 1e-3
        assert (model(ids) - patch_oracle(hf, cfg)(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("shared", [2, 0])
def test_transformers_checkpoint_loads_in_dsv2(tmp_path, shared):
    """A checkpoint written by transformers (sharded, with an index) loads into dsv2 with identical logits; without
    shared experts transformers writes zero-size shared_experts tensors, which load as nothing."""
    hf_cfg = DeepseekV2Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_shared_experts=shared, n_routed_experts=8, num_experts_per_tok=2,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=1.5,
        initializer_range=0.1,
    )
    hf = DeepseekV2ForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = load_checkpoint(tmp_path).eval()
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4


def test_sharded_dsv2_checkpoint_loads_in_transformers(tmp_path):
    cfg = ModelConfig.from_preset("tiny", initializer_range=0.1)
    model = DeepseekV2(cfg).eval()
    save_checkpoint(model, tmp_path, max_shard_size="60KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    hf = patch_oracle(DeepseekV2ForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval(), cfg)
    back = load_checkpoint(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        ours = model(ids)
        assert (ours - hf(ids).logits).abs().max() < 1e-4
        assert torch.equal(ours, back(ids))
