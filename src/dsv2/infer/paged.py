"""The paged latent KV cache of the serving engine: a pool of fixed-size blocks shared by all requests.

Per token and layer the pool holds only what MLA needs: the normalised KV latent c_KV [kv_lora_rank] and the
rotated RoPE key [qk_rope_head_dim] (576 numbers for V2), side by side in one row, optionally quantized to 8 bits
with one float32 scale for the latent and one for the RoPE key (dsv2.infer.quant.quantize_kv). Storage is one flat
slot array per layer, slot = block * block_size + offset, plus one spare block whose first slot swallows the writes
of padding tokens, so writes need no host sync. Reads gather whole blocks (a few KB each: far cheaper than a row
per token), and one row per token means one gather per layer fetches both halves, which the absorbed attention
scores with a single matmul against [q_latent ; q_rope].

A request owns a list of blocks (its block table); the engine allocates them on demand as the request grows and
frees them when it ends. For one forward the engine builds a `PagedBatch` over the rows it runs; the model sees it
as its cache (`lengths`, `lengths_host`, `max_len`, `update`, `advance`), and `update` writes this step's latents
into the blocks and gathers each row's whole context back for the absorbed attention.

    pool = PagedLatentPool.from_memory(cfg, "256MB", block_size=16, kv_dtype="int8")
    blocks = pool.allocate(pool.blocks_for(100))
"""

from __future__ import annotations

import math

import torch

from dsv2.config import ModelConfig
from dsv2.infer.quant import KV_CACHE_KINDS, dequantize_kv, quantize_kv
from dsv2.model.fp8 import FP8_DTYPE
from dsv2.utils import parse_size

_STORAGE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": FP8_DTYPE,
            "int8": torch.int8}


def kv_storage_dtype(kind: str | None, model_dtype: torch.dtype) -> torch.dtype:
    if kind not in KV_CACHE_KINDS:
        raise ValueError(f"unknown KV cache dtype {kind!r}; choose one of: auto, bf16, fp16, fp32, fp8, int8")
    return model_dtype if kind is None else _STORAGE[kind]


def kv_bytes_per_token(cfg: ModelConfig, kind: str | None = None, model_dtype: torch.dtype = torch.float32) -> int:
    """Bytes one cached token takes over all layers: latent + RoPE key (+ one float32 scale each if 8-bit)."""
    elem = kv_storage_dtype(kind, model_dtype).itemsize
    scales = 2 * 4 if kind in ("fp8", "int8") else 0
    return cfg.num_hidden_layers * (cfg.kv_cache_dim * elem + scales)


def _write_rows(store: torch.Tensor, layer: int, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """store[layer, slots] = rows. Eager: index_copy_ into the layer's view (the cheapest call). Compiled: through
    the whole tensor, since writing into a view of a graph input makes the compiled step copy the whole input
    back (the whole pool, at every step)."""
    if torch.compiler.is_compiling():
        store.index_put_((torch.tensor(layer, device=slots.device), slots), rows)
    else:
        store[layer].index_copy_(0, slots, rows)


class PagedLatentPool:
    """Blocks of `block_size` token slots for every layer, plus the free list."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, kv_dtype: str | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token (got {num_blocks} x {block_size})")
        self.cfg, self.num_blocks, self.block_size = cfg, num_blocks, block_size
        self.kv_dtype, self.dtype = kv_dtype, dtype  # storage kind; compute dtype handed back to attention
        self.quantized = kv_dtype in ("fp8", "int8")
        store = kv_storage_dtype(kv_dtype, dtype)
        L, n = cfg.num_hidden_layers, (num_blocks + 1) * block_size  # + the spare block
        self.spare_slot = num_blocks * block_size
        self.r = cfg.kv_cache_parts[0]  # MLA: the latent (then the RoPE key); MHA/GQA/MQA: the keys (then values)
        self.cache = torch.zeros(L, n, cfg.kv_cache_dim, dtype=store, device=device)  # [L, slots, r + dr]
        if self.quantized:  # float32 scales of the latent and of the RoPE key
            self.scales = torch.ones(L, n, 2, dtype=torch.float32, device=device)
        # a compiled step specialises on the pool's size: a pool lives as long as its engine, and a second engine
        # with another pool size would otherwise make torch.compile treat the size as dynamic (slower indexing code
        # at every step; a one-time recompile per pool size is far cheaper)
        for t in (self.cache, self.scales) if self.quantized else (self.cache,):
            torch._dynamo.mark_static(t)
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low block ids first

    @classmethod
    def from_memory(cls, cfg: ModelConfig, memory: int | str, block_size: int = 16, kv_dtype: str | None = None,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "PagedLatentPool":
        """As many blocks as fit in `memory` bytes (an int, or "512MB", "2GiB")."""
        per_block = block_size * kv_bytes_per_token(cfg, kv_dtype, dtype)
        num_blocks = parse_size(memory) // per_block
        if num_blocks < 1:
            raise ValueError(f"KV cache memory {memory} holds no block of {block_size} tokens "
                             f"({per_block} bytes each)")
        return cls(cfg, num_blocks, block_size, kv_dtype, dtype, device)

    # ---- accounting ----------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache pool exhausted: {n} block(s) wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def nbytes(self) -> int:
        """Bytes of all blocks (the spare slot excluded)."""
        return self.num_blocks * self.block_bytes()

    def block_bytes(self) -> int:
        return self.block_size * kv_bytes_per_token(self.cfg, self.kv_dtype, self.dtype)

    # ---- data ----------------------------------------------------------------------------------------------
    def write(self, layer: int, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """slots [N] (the spare slot for padding), rows [N, r + dr] (c_KV ; k_rope)."""
        if self.quantized:
            q_kv, s_kv = quantize_kv(rows[:, : self.r], self.kv_dtype)
            q_pe, s_pe = quantize_kv(rows[:, self.r:], self.kv_dtype)
            rows = torch.cat([q_kv, q_pe], dim=-1)
            _write_rows(self.scales, layer, slots, torch.cat([s_kv, s_pe], dim=-1))
        # fp8 has no CPU index_copy kernel: copy its bytes; the spare slot may take several rows (any one wins)
        store = self.cache
        if store.dtype == FP8_DTYPE:
            store, rows = store.view(torch.uint8), rows.view(torch.uint8)
        _write_rows(store, layer, slots, rows if rows.dtype == store.dtype else rows.to(store.dtype))

    def read(self, layer: int, block_tables: torch.Tensor, n_keys: int | None, dtype: torch.dtype | None = None
             ) -> torch.Tensor:
        """The first n_keys token rows of each row's blocks (None: all of them): block_tables [B, nb] ->
        [B, n_keys, r + dr] (latent ; RoPE key) in `dtype` (default: the pool's compute dtype)."""
        dtype = dtype or self.dtype
        B, nb = block_tables.shape
        flat = block_tables.flatten()
        # gather [blocks, block_size, r + dr] and merge (block, offset), every size from the (static) pool tensor:
        # under torch.compile with the batch and the table width dynamic, gathering flat block rows and splitting them
        # again, or sizes from self.num_blocks (a Python int that dynamo makes symbolic once two pools differ), made
        # inductor copy the gathered rows again element by element, with integer divisions (2-5x slower steps)
        store = self.cache[layer].view(-1, self.block_size, self.cache.shape[-1])
        if store.dtype == FP8_DTYPE:
            rows = store.view(torch.uint8).index_select(0, flat).view(FP8_DTYPE)
        else:
            rows = store.index_select(0, flat)
        rows = rows.view(B, nb * self.block_size, -1)[:, :n_keys]  # (n_keys None: no slice, no copy)
        if self.quantized:
            s = self.scales[layer].view(-1, self.block_size, 2).index_select(0, flat)
            s = s.view(B, nb * self.block_size, 2)[:, :n_keys]
            return torch.cat([dequantize_kv(rows[..., : self.r], s[..., :1], dtype),
                              dequantize_kv(rows[..., self.r:], s[..., 1:], dtype)], dim=-1)
        return rows if rows.dtype == dtype else rows.to(dtype)


class PagedBatch:
    """The cache one forward sees (a `dsv2.model.attention.LatentKVCache`): rows = the requests being run, each
    with its block table and cached length.

    block_tables [B, max_blocks] (rows padded with block 0; reads past a row's length are masked out by the
    attention), lengths [B] tokens already cached, `lengths_host` the same on the host, so the step's bounds need
    no device sync.
    """

    def __init__(self, pool: PagedLatentPool, block_tables: list[list[int]], lengths: list[int]):
        self.pool = pool
        dev = pool.cache.device
        width = max(len(t) for t in block_tables)
        self.block_tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], device=dev)
        for d in (0, 1):  # a compiled step: one graph for every batch size and width (> 1)
            torch._dynamo.maybe_mark_dynamic(self.block_tables, d)
        self.lengths_host = list(lengths)
        self.lengths = torch.tensor(lengths, device=dev)
        self.max_len = width * pool.block_size

    def update(self, layer: int, rows: torch.Tensor, ctx, dtype: torch.dtype) -> torch.Tensor:
        """Write this step's rows [B, T, r + dr]; return every row's first ctx.kv_len cached rows [B, S, r + dr]
        (None: all the rows' blocks hold)."""
        if ctx.slots is None:  # once per forward: the flat slot of every new token (padding -> the spare slot)
            bs = self.pool.block_size
            pos = ctx.positions  # [B, T]
            blk = self.block_tables.gather(1, (pos // bs).clamp(max=self.block_tables.shape[1] - 1))
            slots = blk * bs + pos % bs
            ctx.slots = (slots if ctx.valid is None else torch.where(ctx.valid, slots, self.pool.spare_slot)).flatten()
        self.pool.write(layer, ctx.slots, rows.flatten(0, 1))
        return self.pool.read(layer, self.block_tables, ctx.kv_len, dtype)

    def advance(self, n_new: list[int]) -> None:
        self.lengths_host = [a + b for a, b in zip(self.lengths_host, n_new)]
        self.lengths = self.lengths + torch.tensor(n_new, device=self.lengths.device)


@torch.inference_mode()
def logits_through_pool(model, ids: torch.Tensor, kv_dtype: str | None = None, chunk: int = 32,
                        block_size: int = 16) -> torch.Tensor:
    """Teacher-forced logits [B, T, vocab] for ids [B, T], every key read back from a block pool of `kv_dtype`
    (chunked prefill on the absorbed path): what quantizing the cache does to the model, position by position."""
    B, T = ids.shape
    per_row = -(-T // block_size)
    pool = PagedLatentPool(model.config, B * per_row, block_size, kv_dtype, model.lm_head.weight.dtype,
                           ids.device)
    tables = [pool.allocate(per_row) for _ in range(B)]
    impl, model.attn_impl = model.attn_impl, "absorb"
    try:
        return torch.cat([model(ids[:, s:s + chunk], cache=PagedBatch(pool, tables, [s] * B))
                          for s in range(0, T, chunk)], dim=1)
    finally:
        model.attn_impl = impl
