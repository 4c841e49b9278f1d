"""transformers' DeepseekV2ForCausalLM as the reference ("the oracle"), on the same weights as a dsv2 model.

The oracle is transformers 4.57.x. Where it deviates from DeepSeek's published formulas (DESIGN.md), `patch_oracle`
brings it in line, so the rest of the network is still compared exactly:
- its gate ignores norm_topk_prob (always scales by routed_scaling_factor);
- its YaRN omits the softmax-scale factor mscale(factor, mscale_all_dim)^2.
"""

from __future__ import annotations

import torch
import transformers
from transformers import DeepseekV2ForCausalLM

from dsv2.checkpoint import save_checkpoint
from dsv2.config import ModelConfig
from dsv2.model.rope import softmax_scale

ORACLE_VERSION = transformers.__version__


def patch_oracle(hf: DeepseekV2ForCausalLM, cfg: ModelConfig) -> DeepseekV2ForCausalLM:
    for layer in hf.model.layers:
        layer.self_attn.scaling = softmax_scale(cfg)
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
            orig = gate.forward

            def normalised(x, _orig=orig, _g=gate):
                idx, w = _orig(x)
                w = w / _g.routed_scaling_factor
                return idx, w / (w.sum(dim=-1, keepdim=True) + 1e-20)

            gate.forward = normalised
    return hf


def oracle_from_dsv2(model, tmp_path, patch: bool = True) -> DeepseekV2ForCausalLM:
    """Save a dsv2 model and load it with transformers (this also tests the checkpoint contract)."""
    save_checkpoint(model, tmp_path)
    hf = DeepseekV2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", torch_dtype=torch.float32)
    hf.eval()
    return patch_oracle(hf, model.config) if patch else hf
