"""`dsv2 init`: a random-weight checkpoint of any preset, written shard by shard without ever holding the model.

    dsv2 init --preset v2-lite --out /work/cache/v2-lite-fp8 --dtype fp8        # 15.7B parameters, ~16 GB
    dsv2 init --preset v2-lite --layers 4 --out /tmp/v2-lite-4l                  # V2-Lite width, 4 layers
    dsv2 init --preset small --out runs/small-random --seed 1

For benchmarks and for trying serving setups at real size on a machine that could never hold the full-precision
model: each tensor is drawn (Normal(0, initializer_range) for matrices, ones for norms, as DeepseekV2.init_weights
does), written and dropped before the next (peak memory about one tensor). Each tensor's values depend only on the
seed and its checkpoint name, so bf16 and fp8 outputs of one seed hold the same weights up to FP8 rounding. No
tokenizer is written (give --tokenizer DIR to the inference verbs).
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path

import torch

from dsv2.checkpoint import hf_tensors, stream_checkpoint
from dsv2.config import PRESETS, ModelConfig
from dsv2.model import DeepseekV2


def random_tensor(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """bf16 values of checkpoint tensor `name`: ones for norm weights, zeros for other vectors (biases),
    Normal(0, std) for matrices, from a generator seeded by (seed, name). FP8 is quantized from these bf16 values,
    so `--dtype fp8` writes exactly what `dsv2 quantize` makes of the `--dtype bf16` output."""
    if len(shape) == 1:
        return (torch.ones(shape) if name.endswith("norm.weight") else torch.zeros(shape)).bfloat16()
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape).normal_(0.0, std, generator=g).bfloat16()


def init_checkpoint(config: ModelConfig, out: str | Path, fp8: bool = False, seed: int = 0,
                    max_shard_size: int | str = "5GB") -> Path:
    """Write a random-weight checkpoint of `config` (bf16, or FP8 block-scaled where an FP8 model quantizes)."""
    with torch.device("meta"):
        model = DeepseekV2(config)
    source = {k: (torch.bfloat16, tuple(t.shape)) for k, t in hf_tensors(model)}
    std = config.initializer_range
    return stream_checkpoint(out, config, source, lambda k: random_tensor(k, source[k][1], std, seed), fp8=fp8,
                             dtype=torch.bfloat16, max_shard_size=max_shard_size, desc="init")


def add_command(subparsers) -> None:
    p = subparsers.add_parser("init", help="write a random-weight checkpoint of a preset (shard by shard)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=list(PRESETS), help="model shape")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist or be empty)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp8"],
                   help="bf16, or fp8: e4m3 weights with 128x128 block scales where an FP8 model has them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None,
                   help="override the number of layers (same per-layer shapes: per-layer time and bytes are real)")
    p.add_argument("--max-shard-size", default="5GB", help="largest weight file, e.g. 2GB")
    p.set_defaults(func=_init)


def _init(args) -> int:
    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    if args.layers is not None and args.layers < 1:
        raise ValueError("--layers must be at least 1")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not empty: random weights never replace a checkpoint; "
                         "choose another --out or remove it first")
    config = ModelConfig.from_preset(args.preset, **overrides)
    out = init_checkpoint(config, args.out, fp8=args.dtype == "fp8", seed=args.seed,
                          max_shard_size=args.max_shard_size)
    size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    print(f"wrote {args.preset} ({config.num_hidden_layers} layers, {args.dtype}, random weights) to {out}: "
          f"{size / 2**30:.2f} GiB")
    return 0
