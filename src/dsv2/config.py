"""ModelConfig: the shape of a DeepSeek-V2 network, its named presets, and HF config.json in and out.

The fields and their names follow transformers' DeepseekV2Config (and DeepSeek's published config.json), so a
config moves between the two without renaming. A few training-only fields that DeepSeek's config does not carry
(the device/communication balance-loss weights, token dropping) are ours and travel in config.json as extra keys,
which transformers keeps and ignores.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ModelConfig:
    vocab_size: int = 102400
    hidden_size: int = 5120
    intermediate_size: int = 12288  # dense MLP (layers < first_k_dense_replace)
    moe_intermediate_size: int = 1536  # one routed or shared expert
    num_hidden_layers: int = 60
    num_attention_heads: int = 128
    # MLA
    q_lora_rank: int | None = 1536  # None: queries are not compressed (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # "mla" (DeepSeek-V2), or a standard baseline for ablations (dsv2.model.attention.GroupedQueryAttention): "mha",
    # "gqa" (kv_heads key/value heads, each shared by a group of query heads) or "mqa" (one key/value head)
    attention_type: str = "mla"
    kv_heads: int | None = None  # gqa only: key/value heads (groups)
    # DeepSeekMoE
    n_shared_experts: int = 2
    n_routed_experts: int = 160
    num_experts_per_tok: int = 6
    topk_method: str = "group_limited_greedy"  # or "greedy"
    n_group: int | None = 8  # expert groups = devices in the paper's device-limited routing
    topk_group: int | None = 3  # groups (devices) one token may reach
    routed_scaling_factor: float = 16.0
    norm_topk_prob: bool = False
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    # balance losses (training only) and token dropping
    aux_loss_alpha: float = 0.003  # expert-level
    device_loss_alpha: float = 0.05
    comm_loss_alpha: float = 0.02
    seq_aux: bool = True  # expert-level loss per sequence (DeepSeek's reference) rather than per batch
    token_drop: bool = False
    capacity_factor: float = 1.0
    drop_exempt_fraction: float = 0.1  # share of sequences whose tokens are never dropped
    # the rest
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn", "factor": 40, ...}
    max_position_embeddings: int = 163840
    initializer_range: float = 0.006
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_kv_heads(self) -> int | None:
        """Key/value heads of a standard-attention variant (None for MLA, which caches a latent instead)."""
        return {"mla": None, "mha": self.num_attention_heads, "mqa": 1, "gqa": self.kv_heads}[self.attention_type]

    @property
    def kv_cache_parts(self) -> tuple[int, int]:
        """The two parts of one cached row per token per layer: MLA's normalised KV latent and shared RoPE key;
        a standard variant's keys ([nope ; rope] per KV head) and values."""
        if self.attention_type == "mla":
            return self.kv_lora_rank, self.qk_rope_head_dim
        return self.n_kv_heads * self.qk_head_dim, self.n_kv_heads * self.v_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Numbers cached per token per layer (the width of one cache row)."""
        return sum(self.kv_cache_parts)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def n_expert_groups(self) -> int:
        return self.n_group if self.n_group else 1

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"invalid model config: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "v_head_dim", "intermediate_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, f"{name} must be a positive int")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank must be positive or null")
        need(self.attention_type in ("mla", "mha", "gqa", "mqa"),
             f"attention_type {self.attention_type!r} is not 'mla', 'mha', 'gqa' or 'mqa'")
        if self.attention_type == "gqa":
            need(isinstance(self.kv_heads, int) and self.kv_heads > 0
                 and self.num_attention_heads % self.kv_heads == 0,
                 f"gqa needs kv_heads dividing num_attention_heads ({self.num_attention_heads}), got {self.kv_heads}")
        else:
            need(self.kv_heads is None, f"kv_heads is for attention_type 'gqa' only (got {self.attention_type!r})")
        from dsv2.model.moe import ACTIVATIONS  # here: dsv2.model imports this module

        need(self.hidden_act in ACTIVATIONS, f"hidden_act {self.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}")
        need(self.topk_method in ("greedy", "group_limited_greedy"),
             f"topk_method {self.topk_method!r} is not 'greedy' or 'group_limited_greedy'")
        if self.n_routed_experts > 0:
            need(0 < self.num_experts_per_tok <= self.n_routed_experts,
                 "num_experts_per_tok must be in 1..n_routed_experts")
            need(self.moe_layer_freq >= 1, "moe_layer_freq must be >= 1")
            if self.n_group:
                need(self.n_routed_experts % self.n_group == 0, "n_routed_experts must be divisible by n_group")
            if self.topk_method == "group_limited_greedy":
                need(bool(self.n_group) and bool(self.topk_group), "group_limited_greedy needs n_group and topk_group")
                need(self.topk_group <= self.n_group, "topk_group must be <= n_group")
                need(self.topk_group * (self.n_routed_experts // self.n_group) >= self.num_experts_per_tok,
                     "topk_group groups must hold at least num_experts_per_tok experts")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(kind in ("yarn", "linear", "default", None),
                 f"rope_scaling type {kind!r} is not supported (yarn or linear)")
            if kind in ("yarn", "linear"):
                f = self.rope_scaling.get("factor")
                need(isinstance(f, (int, float)) and f >= 1, f"rope_scaling factor must be a number >= 1, got {f!r}")

    # ---- presets -------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        kw = dict(PRESETS[name])
        kw.update(overrides)
        return cls(**kw)

    # ---- HF config.json ------------------------------------------------------------------------------------
    def to_hf(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.attention_type == "mla":  # MLA's config.json is exactly transformers' (no key of the variants)
            del d["attention_type"], d["kv_heads"]
        d.update(
            model_type="deepseek_v2",
            architectures=["DeepseekV2ForCausalLM"],
            num_key_value_heads=self.n_kv_heads or self.num_attention_heads,
            torch_dtype="bfloat16",
        )
        if d["rope_scaling"] is not None:
            rs = dict(d["rope_scaling"])
            # transformers validates beta_fast/beta_slow as floats
            for k in ("beta_fast", "beta_slow", "factor", "mscale", "mscale_all_dim"):
                if k in rs and rs[k] is not None:
                    rs[k] = float(rs[k])
            rs.setdefault("rope_type", rs.get("type", "yarn"))
            d["rope_scaling"] = rs
        return d

    @classmethod
    def from_hf(cls, src: str | Path | dict) -> "ModelConfig":
        """Build from a config.json path, a checkpoint directory, or an already-parsed dict."""
        if isinstance(src, dict):
            d = src
        else:
            p = Path(src)
            if p.is_dir():
                p = p / "config.json"
            if not p.exists():
                raise FileNotFoundError(f"config.json not found: {p}")
            try:
                d = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"malformed config.json at {p}: {e.msg} (line {e.lineno})") from None
            if not isinstance(d, dict):
                raise ValueError(f"malformed config.json at {p}: expected a JSON object")
        mt = d.get("model_type")
        if mt != "deepseek_v2":
            raise ValueError(f"model_type is {mt!r}, expected 'deepseek_v2'")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if kw.get("n_routed_experts") is None:
            kw["n_routed_experts"] = 0
        if kw.get("n_shared_experts") is None:
            kw["n_shared_experts"] = 0
        if kw.get("rope_scaling") is not None:
            rs = dict(kw["rope_scaling"])
            kind = rs.pop("rope_type", None)  # transformers' alias of "type"; to_hf writes it back
            rs.setdefault("type", kind)
            kw["rope_scaling"] = rs
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        try:
            return cls(**kw)
        except TypeError as e:
            raise ValueError(f"bad config.json field: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf(), indent=2) + "\n")


def yarn_scaling(factor: float = 40.0, original_max: int = 4096, mscale: float = 0.707,
                 mscale_all_dim: float = 0.707, beta_fast: float = 32.0, beta_slow: float = 1.0) -> dict:
    """The rope_scaling block of DeepSeek-V2 (YaRN, 4K -> 160K positions)."""
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original_max,
            "mscale": mscale, "mscale_all_dim": mscale_all_dim, "beta_fast": beta_fast, "beta_slow": beta_slow}


PRESETS: dict[str, dict] = {
    "v2": dict(rope_scaling=yarn_scaling()),
    "v2-lite": dict(
        hidden_size=2048, num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, intermediate_size=10944,
        moe_intermediate_size=1408, n_routed_experts=64, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0, aux_loss_alpha=0.001, rope_scaling=yarn_scaling(),
    ),
    # "small": 19.8M parameters (4.45M active per token, 5.5M with the embedding row); trains on a laptop CPU in
    # minutes. V2's proportions: fine-grained experts (2 shared + 64 routed, top-6) with group-limited routing (8
    # groups, top-3).
    "small": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=3,
        routed_scaling_factor=1.0, max_position_embeddings=2048, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    ),
    # "tiny": for tests; a forward pass takes milliseconds.
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=1.0, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        initializer_range=0.02,
    ),
}


__all__ = ["ModelConfig", "PRESETS", "yarn_scaling"]
