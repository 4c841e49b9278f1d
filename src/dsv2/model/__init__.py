"""The DeepSeek-V2 network: MLA attention, DeepSeekMoE, decoupled RoPE with YaRN."""

from dsv2.model.attention import MLA, LatentCache, RMSNorm
from dsv2.model.moe import MoE, balance_losses, device_token_drop
from dsv2.model.transformer import DeepseekV2, count_parameters

__all__ = ["DeepseekV2", "LatentCache", "MLA", "MoE", "RMSNorm", "balance_losses", "count_parameters",
           "device_token_drop"]
