"""`dsv2 info`: parameter counts (total and activated per token) and the paper's KV-cache table.

    dsv2 info --preset v2            # 235.74B total, 20.85B activated (21.38B with the embedding table)
    dsv2 info --model ckpt/ --json

Activated parameters follow the paper's convention (V2 "21B", V2-Lite "2.4B"): the embedding table is left out,
since a token only looks up one row of it. The count with the table is reported too, labelled. With tied
embeddings the table is also the output projection, so it stays in. Everything is computed on the meta device,
so the full V2 needs no memory.
"""

from __future__ import annotations

import json

from dsv2.checkpoint import load_config
from dsv2.config import PRESETS, ModelConfig
from dsv2.model import count_parameters

BYTES = {"bf16": 2, "fp8": 1}


def kv_cache_table(cfg: ModelConfig, gqa_groups: int = 8) -> list[dict]:
    """Cached elements per token (all layers) for MLA as configured vs MHA / GQA / MQA with the same heads and
    per-head dim (d_h = qk_nope_head_dim, as the paper's comparison does); for a model whose attention_type is not
    MLA, a last row with what it caches (keys [nope ; rope] and values of its KV heads)."""
    L, h, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.qk_nope_head_dim
    gqa_groups = min(gqa_groups, h)  # never more KV groups than heads (a 4-head model's GQA-8 is its MHA)
    rows = [
        ("MHA", 2 * h * d),
        (f"GQA ({gqa_groups} groups)", 2 * gqa_groups * d),
        ("MQA", 2 * d),
        ("MLA (dsv2)", cfg.kv_lora_rank + cfg.qk_rope_head_dim),
    ]
    mla = rows[-1][1]
    if cfg.attention_type != "mla":  # a standard-attention variant (ablations): what this model caches
        rows.append((f"{cfg.attention_type.upper()} (this model)", cfg.kv_cache_dim))
    return [{"mechanism": name, "elements_per_token_per_layer": per_layer, "elements_per_token": per_layer * L,
             **{f"bytes_per_token_{k}": per_layer * L * b for k, b in BYTES.items()},
             "relative_to_mla": per_layer / mla} for name, per_layer in rows]


def parameter_counts(cfg: ModelConfig) -> dict:
    """count_parameters with both activated conventions under explicit names (no bare "activated")."""
    counts = dict(count_parameters(cfg))
    with_embedding = counts.pop("activated")
    tied = counts["lm_head"] == 0  # the table is the output projection too: every token uses all of it
    return {"total": counts.pop("total"),
            "activated_excluding_embedding": with_embedding if tied else with_embedding - counts["embedding"],
            "activated_including_embedding": with_embedding, **counts}


def model_info(cfg: ModelConfig) -> dict:
    return {"config": cfg.to_hf(), "parameters": parameter_counts(cfg), "kv_cache": kv_cache_table(cfg)}


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def format_info(info: dict, name: str) -> str:
    p = info["parameters"]
    c = info["config"]
    lines = [
        f"model            {name}",
        f"parameters       {_human(p['total'])} total, {_human(p['activated_excluding_embedding'])} activated per "
        "token (the paper's convention: without the embedding table)",
        f"                 {_human(p['activated_including_embedding'])} activated with the embedding table "
        f"(exact: {p['total']:,} / {p['activated_excluding_embedding']:,} / {p['activated_including_embedding']:,})",
        f"shape            {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} heads, "
        f"vocab {c['vocab_size']}",
        f"MLA              q_lora {c['q_lora_rank']}, kv_lora {c['kv_lora_rank']}, qk_nope {c['qk_nope_head_dim']}, "
        f"qk_rope {c['qk_rope_head_dim']}, v_head {c['v_head_dim']}",
        f"MoE              {c['n_shared_experts']} shared + {c['n_routed_experts']} routed, top-{c['num_experts_per_tok']}, "
        f"{c['topk_method']}" + (f" ({c['n_group']} groups, top-{c['topk_group']})"
                                 if c["topk_method"] == "group_limited_greedy" else "")
        + f", first {c['first_k_dense_replace']} dense",
        "",
        f"{'layer':>5}  {'kind':<5}  {'params':>10}  {'attention':>10}  {'ffn':>10}  {'activated':>10}",
    ]
    layers = p["layers"]
    shown = layers if len(layers) <= 8 else layers[:3] + [None] + layers[-2:]
    for r in shown:
        if r is None:
            lines.append(f"{'...':>5}")
            continue
        lines.append(f"{r['layer']:>5}  {r['kind']:<5}  {_human(r['params']):>10}  {_human(r['attention']):>10}  "
                     f"{_human(r['ffn']):>10}  {_human(r['activated']):>10}")
    lines.append(f"embedding {_human(p['embedding'])}, lm_head {_human(p['lm_head'])}")
    lines += ["", "KV cache per token (all layers)",
              f"{'mechanism':<16} {'elem/layer':>10} {'elements':>10} {'bf16 bytes':>11} {'fp8 bytes':>10} {'x MLA':>7}"]
    for r in info["kv_cache"]:
        lines.append(f"{r['mechanism']:<16} {r['elements_per_token_per_layer']:>10,} {r['elements_per_token']:>10,} "
                     f"{r['bytes_per_token_bf16']:>11,} {r['bytes_per_token_fp8']:>10,} {r['relative_to_mla']:>7.1f}")
    return "\n".join(lines)


def _run(args) -> int:
    if args.model:
        cfg, name = load_config(args.model), str(args.model)
    else:
        cfg, name = ModelConfig.from_preset(args.preset), f"preset {args.preset}"
    info = model_info(cfg)
    print(json.dumps(info, indent=2) if args.json else format_info(info, name))
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("info", help="parameter counts and KV-cache size of a preset or checkpoint",
                       description="Total and activated parameters (counted on the meta device, no memory), a "
                                   "per-layer breakdown, and the KV-cache elements/bytes per token of MLA vs "
                                   "MHA, GQA and MQA.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=list(PRESETS), help="a named model shape")
    src.add_argument("--model", help="a checkpoint directory (reads only config.json)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run)
