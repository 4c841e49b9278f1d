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
import math
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from dsv2.config import ModelConfig
from dsv2.model import DeepseekV2
from dsv2.model.fp8 import FP8_DTYPE, FP8_QUANT_CONFIG, SCALE, FP8Conversion, fp8_skeleton, scale_shape
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


def to_hf(name: str, n_experts: int, fused: bool = False, first: int = 0) -> list[str]:
    """Checkpoint names of the tensors that make up model tensor `name`, in stacking order: an expert stack
    [E, k * rows, cols] is `t.reshape(len(names), rows, cols)` (expert 0's gate, expert 0's up, expert 1's gate...).
    fused: the transformers 5.x name of an expert weight stack instead (one tensor, our layout); tensors without
    a fused form (FP8 scales, everything outside the experts) keep their names. first: the stack's first expert
    (an expert-parallel shard holds experts first .. first + n_experts - 1)."""
    m = _MODEL_EXPERTS.match(name)
    if not m or m.group(2) not in _EXPERTS:
        return [name]
    prefix, (per_expert, fused_name) = m.group(1), _EXPERTS[m.group(2)]
    if fused and fused_name:
        return [f"{prefix}.{fused_name}"]
    return [f"{prefix}.{e}.{p}" for e in range(first, first + n_experts) for p in per_expert]


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


def _expert_span(model: DeepseekV2, name: str, n_experts: int) -> tuple[int, int]:
    """(first expert, experts) of the stack `name` holds: all of them, or an expert-parallel shard's."""
    m = _MODEL_EXPERTS.match(name)
    if not m:
        return 0, n_experts
    experts = model.get_submodule(m.group(1))
    return getattr(experts, "first_expert", 0), getattr(experts, m.group(2)).shape[0]


def hf_tensors(model: DeepseekV2, experts_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every weight (or the routed experts' only), experts unstacked (views)."""
    n_experts = model.config.n_routed_experts
    for name, t in model.state_dict().items():
        if (model.config.tie_word_embeddings and name == "lm_head.weight") or (
                experts_only and not _MODEL_EXPERTS.match(name)):
            continue
        first, n = _expert_span(model, name, n_experts)
        names = to_hf(name, n, first=first)
        yield from zip(names, _parts(t, len(names)))


# ---- saving --------------------------------------------------------------------------------------------------
def save_checkpoint(model: DeepseekV2, path: str | Path, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write config.json and safetensors weights (sharded above max_shard_size) that transformers'
    DeepseekV2ForCausalLM.from_pretrained loads. `extra(tmp_dir)` may add files (tokenizer, trainer state)
    that must land atomically with the weights."""
    path = Path(path)
    limit = parse_size(max_shard_size)
    tmp = new_temp_dir(path)
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
        sizes = {}
        for fname, shard in zip(files, shards):
            sizes[fname] = write_weights(shard, tmp / fname, dtype)
        finish_checkpoint(tmp, path, model.config, sizes, dtype or model.lm_head.weight.dtype, extra)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# The pieces of a save, also used by a save written by several processes at once (expert parallel: each writes
# its own experts' file into the same temporary directory, then one finishes it).
def new_temp_dir(path: Path, tag: str | int | None = None) -> Path:
    """An empty directory beside `path` to write a checkpoint into (then finish_checkpoint swaps it in)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid() if tag is None else tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def write_weights(tensors: Iterable[tuple[str, torch.Tensor]], file: Path,
                  dtype: torch.dtype | None = None) -> dict[str, int]:
    """One safetensors file of (checkpoint name, tensor) pairs, on CPU in `dtype` (FP8 kept); name -> bytes."""
    out = {n: t.detach().to(device="cpu", dtype=_cast(n, t, dtype)).clone() for n, t in tensors}
    save_file(out, file, metadata={"format": "pt"})
    return {n: t.numel() * t.itemsize for n, t in out.items()}


def finish_checkpoint(tmp: Path, path: Path, config: ModelConfig, sizes: dict[str, dict[str, int]],
                      dtype: torch.dtype, extra: Callable[[Path], None] | None = None) -> None:
    """Complete a checkpoint whose weight files (file name -> {tensor name: bytes}) are in `tmp`: the index
    (several files), config.json, `extra(tmp)`, then swap it in under `path`."""
    weight_map = {n: fname for fname, names in sizes.items() for n in names}
    if len(sizes) > 1:
        total = sum(b for names in sizes.values() for b in names.values())
        (tmp / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    hf = config.to_hf()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    if any(n.endswith(SCALE) for n in weight_map):
        hf["quantization_config"] = FP8_QUANT_CONFIG
    (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if extra is not None:
        extra(tmp)
    _swap_in(tmp, path)


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


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SafetensorsFile:
    """A safetensors file read with plain file reads into fresh tensors. safetensors' own reader memory-maps the
    file and every tensor it returns keeps the mapping alive, so a loaded model kept all its shards mapped (RSS
    counted them on top of the weights); here nothing stays mapped, and what a load holds is what the model holds."""

    def __init__(self, file: Path):
        self.file = Path(file)
        with open(self.file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100 * 2**20:
                raise ValueError(f"header size {n} out of range")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.entries, self.data_start, self.size = header, 8 + n, self.file.stat().st_size

    def keys(self):
        return self.entries.keys()

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        e = self.entries[name]
        return _ST_DTYPES[e["dtype"]], tuple(e["shape"])

    def get_tensor(self, name: str) -> torch.Tensor:
        dtype, shape = self.info(name)
        begin, end = self.entries[name]["data_offsets"]
        t = torch.empty(shape, dtype=dtype)
        nbytes = t.numel() * t.element_size()
        if end - begin != nbytes or self.data_start + end > self.size:
            raise ValueError(f"{nbytes} bytes expected at {begin}..{end}, file has {self.size} (truncated?)")
        buf = memoryview(t.view(-1).view(torch.uint8).numpy())
        with open(self.file, "rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            done = 0
            while done < nbytes:
                got = f.readinto(buf[done:])
                if not got:
                    raise ValueError("unexpected end of file")
                done += got
        return t


def _open(file: Path) -> SafetensorsFile:
    try:
        return SafetensorsFile(file)
    except (OSError, ValueError, KeyError, TypeError) as e:  # truncated or not a safetensors file
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
                    config: ModelConfig | None = None, fp8: bool | None = None,
                    prepare: Callable[[DeepseekV2], object] | None = None, check_memory: bool = True) -> DeepseekV2:
    """Load a HF-layout DeepSeek-V2 checkpoint (ours, transformers', or DeepSeek's published one).

    fp8: None loads weights as stored (FP8 checkpoints with `weight_scale_inv` tensors give FP8 modules, see
    dsv2.model.fp8); True quantizes a full-precision checkpoint to FP8 while loading, one tensor at a time;
    False dequantizes an FP8 checkpoint (to `dtype`, bfloat16 by default).
    prepare(model) runs on the meta-device model before any tensor is read; expert parallel splits the expert
    stacks there, so only this process's experts are read (dsv2.train.expert_parallel).
    check_memory: before reading any weight, compare the bytes the model will hold with the memory free on
    `device` and refuse (CheckpointError naming fp8, bf16 and smaller models) when they do not fit.
    Tensors are read with plain file reads (no mapping outlives the load) and each is quantized once.
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
        if prepare is not None:
            prepare(model)
    expected = {n: t for n, t in model.state_dict().items()
                if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
    sources, others = {}, set()  # others: experts another process holds (expert parallel), not read here
    for n in expected:
        first, n_local = _expert_span(model, n, n_experts)
        fused = to_hf(n, n_experts, fused=True)
        if n_local < n_experts:
            sources[n] = to_hf(n, n_local, first=first)
            others.update(set(to_hf(n, n_experts)) - set(sources[n]))
        else:
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
    def empty(k: str) -> bool:  # transformers writes zero-size shared_experts tensors when n_shared_experts is 0
        if k not in files:
            return False
        if files[k] not in handles:
            handles[files[k]] = _open(files[k])
        return 0 in handles[files[k]].info(k)[1]

    extra = [k for k in available if k not in wanted and k not in others and not _IGNORABLE.search(k)
             and not empty(k)]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}")
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:3])}")

    if check_memory:
        _check_memory(path, cfg, expected, sources, handles, files, dtype, device, fp8)

    state = {}
    for name, meta in expected.items():
        names = sources[name]
        want = _part_shape(meta.shape, len(names))
        t = None
        for i, k in enumerate(names):
            part = read(k)
            if tuple(part.shape) != want:
                raise CheckpointError(f"{path}: tensor {k} has shape {tuple(part.shape)}, expected {want}")
            if len(names) == 1:
                t = part.to(device=device, dtype=_cast(name, part, dtype))
            else:  # per-expert parts copied into one stack as they come (no list of parts + a stacked copy)
                if t is None:
                    t = torch.empty((len(names), *want), dtype=_cast(name, part, dtype), device=device)
                t[i].copy_(part)
            del part
        state[name] = t.reshape(meta.shape)
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


# ---- memory --------------------------------------------------------------------------------------------------
def available_memory(device: str | torch.device = "cpu") -> int | None:
    """Bytes free for new tensors on `device`: CUDA's free memory; on CPU MemAvailable, within the cgroup's limit
    (containers). None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = []
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        pass
    try:
        cg = Path("/sys/fs/cgroup")
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":  # the page cache the cgroup charges (inactive part) is reclaimable: count it free
            stat = dict(line.split() for line in (cg / "memory.stat").read_text().splitlines())
            free.append(int(limit) - int((cg / "memory.current").read_text()) + int(stat.get("inactive_file", 0)))
    except (OSError, ValueError):
        pass
    return min(free) if free else None


def weights_nbytes(config: ModelConfig, fp8: bool = False, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes a model of `config` holds: FP8 modules at 1 byte per weight plus float32 block scales (fp8), the rest
    in `dtype`."""
    with torch.device("meta"):
        model = DeepseekV2(config)
        if fp8:
            fp8_skeleton(model)
    tensors = {n: t for n, t in model.state_dict().items()
               if not (config.tie_word_embeddings and n == "lm_head.weight")}
    return sum(t.numel() * (t.element_size() if t.dtype == FP8_DTYPE or n.endswith(SCALE) else dtype.itemsize)
               for n, t in tensors.items())


def _check_memory(path, cfg, expected, sources, handles, files, dtype, device, fp8) -> None:
    """CheckpointError when the weights this load makes (plus its largest transient tensor) exceed free memory."""
    free = available_memory(device)
    if free is None:
        return

    def stored(k: str) -> tuple[torch.dtype, tuple[int, ...]]:
        f = files[k]
        if f not in handles:
            handles[f] = _open(f)
        return handles[f].info(k) if k in handles[f].keys() else (torch.float32, ())

    need, transient = 0, 0
    for name, meta in expected.items():
        if meta.dtype == FP8_DTYPE or name.endswith(SCALE):
            need += meta.numel() * meta.element_size()
            continue
        k = sources[name][0]
        st, shape = stored(k) if k in files else (torch.float32, ())
        out = dtype or (torch.bfloat16 if st == FP8_DTYPE else st)
        need += meta.numel() * out.itemsize
        transient = max(transient, math.prod(shape) * 4)  # a part read (and quantized in float32) before it is held
    if need + transient <= free:
        return
    gib = lambda b: f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"  # noqa: E731
    options = []
    fp8_need, bf16_need = weights_nbytes(cfg, fp8=True), weights_nbytes(cfg)
    if fp8_need < need:
        options.append(f"FP8 ({gib(fp8_need)}: --fp8, load_checkpoint(fp8=True), or `dsv2 quantize` first)")
    if bf16_need < need and not fp8:
        options.append(f"bf16 ({gib(bf16_need)}: --dtype bfloat16)")
    options.append("a smaller preset")
    raise CheckpointError(f"{path}: the weights need {gib(need + transient)} but {device} has {gib(free)} free; "
                          f"load them as {' or '.join(options)}")


# ---- streaming writes: dsv2 quantize, dsv2 init ---------------------------------------------------------------
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _fp8_names(config: ModelConfig, names) -> set[str]:
    """The checkpoint weights an FP8 model of `config` holds in FP8 (per-expert names)."""
    with torch.device("meta"):
        model = DeepseekV2(config)
        fp8_skeleton(model)
    out = {k for n, t in model.state_dict().items() if t.dtype == FP8_DTYPE
           for k in to_hf(n, config.n_routed_experts)}
    missing = sorted(out - set(names))
    if missing:
        raise CheckpointError(f"{len(missing)} weight(s) to quantize are not stored under their per-expert names, "
                              f"e.g. {missing[0]} (fused expert stacks: load the checkpoint and save it instead)")
    return out


def stream_checkpoint(path: str | Path, config: ModelConfig, source: dict[str, tuple[torch.dtype, tuple]],
                      read: Callable[[str], torch.Tensor], fp8: bool = False, dtype: torch.dtype | None = None,
                      max_shard_size: int | str = "5GB", extra: Callable[[Path], None] | None = None,
                      desc: str = "writing") -> Path:
    """Write a checkpoint one tensor at a time: `source` lists the checkpoint's tensors (name -> stored dtype,
    shape) in writing order and read(name) makes each when its turn comes, so peak memory is about one tensor
    (never a model, never a shard). fp8: the weights an FP8 model quantizes are written as FP8 with their block
    scales (each quantized once); the others in `dtype` (None: as read). Same layout, index and atomic swap-in as
    save_checkpoint; a tqdm bar counts the bytes."""
    path = Path(path)
    fp8_names = _fp8_names(config, source) if fp8 else set()
    entries = []  # (name, dtype, shape) in writing order
    for k, (dt, shape) in source.items():
        if k in fp8_names:
            entries += [(k, FP8_DTYPE, tuple(shape)), (k + SCALE, torch.float32, scale_shape(shape))]
        else:
            entries.append((k, dtype or dt, tuple(shape)))
    produce = FP8Conversion(source, read, fp8_names).read if fp8_names else read
    limit = parse_size(max_shard_size)
    shards: list[list[tuple]] = [[]]
    size = 0
    for e in entries:
        nbytes = math.prod(e[2]) * e[1].itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    files = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(math.prod(e[2]) * e[1].itemsize for e in entries)
    tmp = new_temp_dir(path)
    try:
        sizes = {}
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None) as bar:
            for fname, shard in zip(files, shards):
                sizes[fname] = _write_streamed(tmp / fname, shard, produce, bar)
        stored_dtypes = [dt for dt, _ in source.values() if dt.is_floating_point and dt != FP8_DTYPE]
        finish_checkpoint(tmp, path, config, sizes, dtype or (stored_dtypes[0] if stored_dtypes else torch.bfloat16),
                          extra)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_streamed(file: Path, shard: list[tuple], produce: Callable[[str], torch.Tensor], bar) -> dict[str, int]:
    """One safetensors file: the header (all offsets known from the shapes), then each tensor as produced."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset, sizes = 0, {}
    for name, dt, shape in shard:
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        sizes[name] = nbytes
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, dt, shape in shard:
            t = produce(name).to("cpu")
            if tuple(t.shape) != shape:
                raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
            t = t.to(dt).contiguous()
            if t.numel():
                f.write(t.view(-1).view(torch.uint8).numpy())
            bar.update(sizes[name])
            del t
    return sizes


def quantize_checkpoint(src: str | Path, out: str | Path, max_shard_size: int | str = "5GB",
                        extra: Callable[[Path], None] | None = None) -> Path:
    """Write an FP8 copy of a full-precision checkpoint tensor by tensor (`dsv2 quantize`): the weights
    convert_model_fp8 would quantize become FP8 + 128x128 block scales, everything else is copied as stored."""
    src, out = Path(src), Path(out)
    cfg = load_config(src)
    files = _weight_files(src)
    if any(k.endswith(SCALE) for k in files):
        raise CheckpointError(f"{src} is already an FP8 checkpoint")
    handles = {f: _open(f) for f in sorted(set(files.values()))}
    order = sorted(files, key=lambda k: (str(files[k]), handles[files[k]].entries[k]["data_offsets"][0]))
    source = {k: handles[files[k]].info(k) for k in order}

    def read(name: str) -> torch.Tensor:
        try:
            return handles[files[name]].get_tensor(name)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{files[name]}: cannot read tensor {name} ({e})") from None

    return stream_checkpoint(out, cfg, source, read, fp8=True, max_shard_size=max_shard_size, extra=extra,
                             desc="quantize")
