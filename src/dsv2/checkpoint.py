"""Checkpoints in the Hugging Face layout: config.json + model.safetensors (or shards + index), no pickle.

One name table (`to_hf` / `from_hf`) maps the model's tensor names to DeepSeek's published names; save, load and
FP8 load (and so `dsv2 quantize`) all go through it. Only the routed experts differ: the model stores them
stacked (`mlp.experts.w13 [E, 2I, H]`, `mlp.experts.w2 [E, H, I]`, and for FP8 their block scales
`w13_scale_inv`, `w2_scale_inv`), the checkpoint per expert (`mlp.experts.E.{gate,up,down}_proj.weight` and
`.weight_scale_inv`, as in DeepSeek's FP8 checkpoints).

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
from dsv2.model.fp8 import FP8_DTYPE, FP8_QUANT_CONFIG, SCALE, FP8Conversion, fp8_skeleton
from dsv2.utils import parse_size

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# checkpoint entries that carry no weights of ours and may be skipped
_IGNORABLE = re.compile(r"(rotary_emb\.inv_freq$)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its config; the message names the problem."""


# ---- the name table ------------------------------------------------------------------------------------------
# Every tensor has the same name in the model and in the checkpoint, except the routed experts: the model stacks
# them, the checkpoint stores one tensor per expert E (0 .. n_experts-1), named as in DeepSeek's checkpoints, FP8
# block scales included; transformers 5.x holds them fused in memory (our layout), and such checkpoints load too.
_EXPERTS = {  # model tensor: (checkpoint tensors per expert, in stacking order; transformers 5.x fused name)
    "w13": (("gate_proj.weight", "up_proj.weight"), "gate_up_proj"),
    "w2": (("down_proj.weight",), "down_proj"),
    "w13_scale_inv": (("gate_proj.weight_scale_inv", "up_proj.weight_scale_inv"), None),
    "w2_scale_inv": (("down_proj.weight_scale_inv",), None),
}
_MODEL_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\w+)$")
_HF_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+\.)?([\w.]+)$")


def to_hf(name: str, n_experts: int, fused: bool = False) -> list[str]:
    """Checkpoint names of the tensors that make up model tensor `name`, in stacking order: an expert stack
    [E, k * rows, cols] is `t.reshape(len(names), rows, cols)` (expert 0's gate, expert 0's up, expert 1's gate...).
    fused: the transformers 5.x name of an expert weight stack instead (one tensor, our layout); tensors without
    a fused form (FP8 scales, everything outside the experts) keep their names."""
    m = _MODEL_EXPERTS.match(name)
    if not m or m.group(2) not in _EXPERTS:
        return [name]
    prefix, (per_expert, fused_name) = m.group(1), _EXPERTS[m.group(2)]
    if fused and fused_name:
        return [f"{prefix}.{fused_name}"]
    return [f"{prefix}.{e}.{p}" for e in range(n_experts) for p in per_expert]


def from_hf(hf_name: str) -> str:
    """The model tensor a checkpoint tensor belongs to (the inverse of to_hf, fused names included)."""
    m = _HF_EXPERTS.match(hf_name)
    if m:
        prefix, index, rest = m.groups()
        for ours, (per_expert, fused_name) in _EXPERTS.items():
            if (rest in per_expert) if index else (rest == fused_name):
                return f"{prefix}.{ours}"
    return hf_name


def _parts(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Model tensor -> the n checkpoint tensors to_hf names (views, not copies)."""
    return [t] if n == 1 else list(t.reshape(n, -1, *t.shape[2:]).unbind(0))


def _part_shape(shape: torch.Size, n: int) -> tuple[int, ...]:
    return tuple(shape) if n == 1 else (shape[0] * shape[1] // n, *shape[2:])


def hf_tensors(model: DeepseekV2) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every weight, experts unstacked (views, not copies)."""
    n_experts = model.config.n_routed_experts
    for name, t in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        names = to_hf(name, n_experts)
        yield from zip(names, _parts(t, len(names)))


# ---- saving --------------------------------------------------------------------------------------------------
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
        if any(n.endswith(SCALE) for n in weight_map):
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
    return t.dtype if dtype is None or t.dtype == FP8_DTYPE or name.endswith(SCALE) else dtype


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
    dsv2.model.fp8); True quantizes a full-precision checkpoint to FP8 while loading, one tensor at a time;
    False dequantizes an FP8 checkpoint (to `dtype`, bfloat16 by default).
    """
    path = Path(path)
    cfg = config or load_config(path)
    n_experts = cfg.n_routed_experts
    files = _weight_files(path)
    stored_fp8 = any(k.endswith(SCALE) for k in files)
    with torch.device("meta"):
        model = DeepseekV2(cfg)
        if fp8 or (fp8 is None and stored_fp8):  # FP8 where the checkpoint is (every eligible module if nowhere)
            fp8_skeleton(model, {from_hf(k) for k in files} if stored_fp8 else None)
    expected = {n: t for n, t in model.state_dict().items()
                if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
    sources = {}
    for n in expected:
        fused = to_hf(n, n_experts, fused=True)
        sources[n] = fused if all(k in files for k in fused) else to_hf(n, n_experts)
    wanted = {k for names in sources.values() for k in names}
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
    fp8_names = {k for n, t in expected.items() if t.dtype == FP8_DTYPE for k in sources[n]}
    if fp8_names or stored_fp8:  # quantize or dequantize where checkpoint and model disagree
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
        names = sources[name]
        want = _part_shape(meta.shape, len(names))
        parts = []
        for k in names:
            parts.append(read(k))
            if tuple(parts[-1].shape) != want:
                raise CheckpointError(f"{path}: tensor {k} has shape {tuple(parts[-1].shape)}, expected {want}")
        t = parts[0] if len(parts) == 1 else torch.stack(parts).reshape(meta.shape)  # per-expert -> one stack
        state[name] = t.to(device=device, dtype=_cast(name, t, dtype))
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
