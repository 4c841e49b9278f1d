"""Checkpoints in the Hugging Face layout: config.json + model.safetensors (or shards + index), no pickle.

One name table (`hf_tensors` / `_hf_names`) maps the model's parameters to DeepSeek's published names. Only the
routed experts differ: the model stores them stacked (`mlp.experts.w13 [E, 2I, H]`, `mlp.experts.w2 [E, H, I]`),
the checkpoint per expert (`mlp.experts.E.{gate,up,down}_proj.weight`).

Loading builds the model on the meta device and reads tensors from memory-mapped safetensors shard by shard, so
peak memory stays near one copy of the weights. Saving writes into a temporary directory beside the target and
swaps it in with renames, so a crash never leaves a half-written checkpoint under the target name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv2.config import ModelConfig
from dsv2.model import DeepseekV2

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# (w13|w2)_scale_inv: the block scales of FP8 expert stacks (dsv2.infer.fp8_model), saved per expert as
# experts.E.{gate,up,down}_proj.weight_scale_inv like DeepSeek's FP8 checkpoints
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(w13|w2)(_scale_inv)?$")
_FP8_SCALE = "_scale_inv"
# checkpoint entries that carry no weights of ours and may be skipped
_IGNORABLE = re.compile(r"(rotary_emb\.inv_freq$)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its config; the message names the problem."""


# ---- the name table ------------------------------------------------------------------------------------------
def _hf_names(name: str, n_experts: int) -> list[str]:
    """Checkpoint names that make up one model parameter (in concatenation order)."""
    m = _EXPERT.match(name)
    if not m:
        return [name]
    prefix, which, scale = m.groups()
    projs = ("gate_proj", "up_proj") if which == "w13" else ("down_proj",)
    return [f"{prefix}.{e}.{p}.weight{scale or ''}" for e in range(n_experts) for p in projs]


def _fused_name(name: str) -> str | None:
    """transformers 5.x keeps experts fused in memory as experts.gate_up_proj [E, 2I, H] / experts.down_proj
    [E, H, I] (our w13 / w2 layout); a checkpoint stored that way is accepted too."""
    m = _EXPERT.match(name)
    return None if not m or m.group(3) else f"{m.group(1)}.{'gate_up_proj' if m.group(2) == 'w13' else 'down_proj'}"


def hf_tensors(model: DeepseekV2) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every weight, experts unstacked (views, not copies)."""
    for name, t in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        m = _EXPERT.match(name)
        if not m:
            yield name, t
            continue
        prefix, which, scale = m.groups()
        suffix = f"weight{scale or ''}"
        for e in range(t.shape[0]):
            if which == "w13":
                gate, up = t[e].chunk(2, dim=0)
                yield f"{prefix}.{e}.gate_proj.{suffix}", gate
                yield f"{prefix}.{e}.up_proj.{suffix}", up
            else:
                yield f"{prefix}.{e}.down_proj.{suffix}", t[e]


# ---- saving --------------------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r} (examples: 5GB, 500MB, 1000000)")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def save_checkpoint(model: DeepseekV2, path: str | Path, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write config.json and safetensors weights (sharded above max_shard_size) that transformers'
    DeepseekV2ForCausalLM.from_pretrained loads. `extra(tmp_dir)` may add files (tokenizer, trainer state)
    that must land atomically with the weights."""
    path = Path(path)
    limit = parse_size(max_shard_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shards: list[list[tuple[str, torch.Tensor]]] = [[]]
        size = 0
        for name, t in hf_tensors(model):
            nbytes = t.numel() * (dtype or t.dtype).itemsize
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append((name, t))
            size += nbytes
        files = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map, total = {}, 0
        for fname, shard in zip(files, shards):
            tensors = {n: t.detach().to(device="cpu", dtype=_cast(n, t, dtype)).clone() for n, t in shard}
            save_file(tensors, tmp / fname, metadata={"format": "pt"})
            for n, t in tensors.items():
                weight_map[n] = fname
                total += t.numel() * t.itemsize
            del tensors
        if len(files) > 1:
            (tmp / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        hf = model.config.to_hf()
        hf["torch_dtype"] = str(dtype or model.lm_head.weight.dtype).removeprefix("torch.")
        if any(n.endswith(_FP8_SCALE) for n in weight_map):
            from dsv2.infer.quant import FP8_QUANT_CONFIG
            hf["quantization_config"] = FP8_QUANT_CONFIG
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if extra is not None:
            extra(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _cast(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype to store/load t in: `dtype` for full-precision tensors; FP8 weights and their scales keep theirs."""
    return t.dtype if dtype is None or t.dtype == torch.float8_e4m3fn or name.endswith(_FP8_SCALE) else dtype


def _swap_in(tmp: Path, path: Path) -> None:
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


# ---- loading -------------------------------------------------------------------------------------------------
def _weight_files(path: Path) -> dict[str, Path]:
    """checkpoint name -> file holding it."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"malformed {index}: {e}") from None
        missing_files = sorted({f for f in weight_map.values() if not (path / f).exists()})
        if missing_files:
            raise CheckpointError(f"{path}: shard file(s) named in the index are missing: {', '.join(missing_files)}")
        return {k: path / f for k, f in weight_map.items()}
    single = path / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
    return {k: single for k in _open(single).keys()}


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError, OSError...: truncated or not a safetensors file
        raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"not a checkpoint directory: {path}")
    try:
        return ModelConfig.from_hf(path)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    config: ModelConfig | None = None, fp8: bool | None = None) -> DeepseekV2:
    """Load a HF-layout DeepSeek-V2 checkpoint (ours, transformers', or DeepSeek's published one).

    fp8: None loads weights as stored (FP8 checkpoints with `weight_scale_inv` tensors give FP8 modules, see
    dsv2.infer.fp8_model); True quantizes a full-precision checkpoint to FP8 while loading, one tensor at a time;
    False dequantizes an FP8 checkpoint (to `dtype`, bfloat16 by default).
    """
    path = Path(path)
    cfg = config or load_config(path)
    files = _weight_files(path)
    stored_fp8 = any(k.endswith(_FP8_SCALE) for k in files)
    with torch.device("meta"):
        model = DeepseekV2(cfg)
        if fp8 or (fp8 is None and stored_fp8):
            from dsv2.infer.fp8_model import fp8_skeleton
            fp8_skeleton(model, files if stored_fp8 else None)
    expected = {n: t for n, t in model.state_dict().items()
                if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
    sources = {n: [_fused_name(n)] if _fused_name(n) in files else _hf_names(n, cfg.n_routed_experts)
               for n in expected}
    wanted = {hf: n for n, names in sources.items() for hf in names}
    handles: dict[Path, object] = {}

    def read(name: str) -> torch.Tensor:
        f = files[name]
        if f not in handles:
            handles[f] = _open(f)
        try:
            return handles[f].get_tensor(name)
        except Exception as e:  # a truncated file fails here, not at open
            raise CheckpointError(f"{f}: cannot read tensor {name} ({e})") from None

    available = files.keys()
    fp8_names = {k for n, t in expected.items() if t.dtype == torch.float8_e4m3fn for k in sources[n]}
    if fp8_names or stored_fp8:  # quantize or dequantize where checkpoint and model disagree
        from dsv2.infer.fp8_model import FP8Conversion
        conv = FP8Conversion(files, read, fp8_names, dtype)
        available, read = conv.names, conv.read
    missing = [k for k in wanted if k not in available]
    extra = [k for k in available if k not in wanted and not _IGNORABLE.search(k)]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}")
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:3])}")

    state = {}
    for name, meta in expected.items():
        parts = [read(k) for k in sources[name]]
        expert = _EXPERT.match(name)
        if expert and len(parts) > 1:  # per-expert tensors -> one stack
            per = 2 if expert.group(2) == "w13" else 1
            want = meta.shape[1:] if per == 1 else (meta.shape[1] // 2, meta.shape[2])
            for k, t in zip(_hf_names(name, cfg.n_routed_experts), parts):
                if tuple(t.shape) != tuple(want):
                    raise CheckpointError(f"{path}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(want)}")
            t = torch.stack([torch.cat(parts[i:i + per]) for i in range(0, len(parts), per)])
        else:
            t = parts[0]
            if tuple(t.shape) != tuple(meta.shape):
                raise CheckpointError(
                    f"{path}: tensor {sources[name][0]} has shape {tuple(t.shape)}, expected {tuple(meta.shape)}")
        state[name] = t.to(device=device, dtype=_cast(name, t, dtype))
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
