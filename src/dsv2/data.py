"""Pretraining data: corpora on disk, a flat token file, fixed-length blocks and batches.

    files = find_corpus_files("corpus/")                        # or None: the Python stdlib sources
    build_token_file("corpus/", tokenizer, "runs/tokens.bin")   # tokenize once -> memory-mapped uint16/32
    ds = PackedDataset("runs/tokens.bin", seq_len=512, val_fraction=0.01)
    loader = BatchLoader(ds, batch_size=32, seed=0, rank=rank, world_size=world_size)
    inputs, targets = loader.next_batch()                       # [B / world_size, T] int64 each

The token file is the documents back to back, each as bos + tokens + eos. Blocks of seq_len + 1 tokens
cut that stream without regard to document boundaries (documents flow from one block into the next),
as in the paper's pretraining; the last blocks are held out for validation.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")  # the whole file is one document
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_STDLIB_MAX_FILE_BYTES = 1 << 20


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        for name in filenames:
            path = Path(dirpath, name)
            # A few generated tables (e.g. unicode data) are huge and teach a model nothing.
            if name.endswith(".py") and path.stat().st_size <= _STDLIB_MAX_FILE_BYTES:
                files.append(path)
    return sorted(files)


def find_corpus_files(spec: str | Path | None) -> list[Path]:
    """Corpus files for `spec`: a directory (recursive), a glob, a single file, or None for the default
    corpus (the running interpreter's standard library sources). Sorted, so the order is deterministic."""
    if spec is None:
        files = _stdlib_files()
        if not files:
            raise FileNotFoundError(f"no Python sources found in {sysconfig.get_paths()['stdlib']}")
        return files
    spec = str(spec)
    if any(c in spec for c in "*?["):
        matches = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
        if not matches:
            raise FileNotFoundError(f"no files match {spec}")
        files = sorted(p for p in matches if p.suffix.lower() in SUPPORTED_SUFFIXES)
    else:
        path = Path(spec)
        if path.is_file():
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise ValueError(f"unsupported corpus file {path} (use one of {', '.join(SUPPORTED_SUFFIXES)})")
            return [path]
        if not path.is_dir():
            raise FileNotFoundError(f"corpus path {path} does not exist")
        # Hidden directories (.git, .venv) hold tooling, not corpus text.
        files = sorted(
            p
            for p in path.rglob("*")
            if p.suffix.lower() in SUPPORTED_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    if not files:
        raise ValueError(f"no {'/'.join(SUPPORTED_SUFFIXES)} files in {spec}")
    return files


def _documents(file: Path, text_field: str) -> Iterator[str]:
    suffix = file.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield file.read_bytes().decode("utf-8", errors="replace")
    elif suffix == ".jsonl":
        with open(file, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{file}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(f"{file}:{lineno}: no field {text_field!r}")
                if record[text_field] is not None:
                    yield str(record[text_field])
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(file)
        if text_field not in pf.schema_arrow.names:
            raise ValueError(f"{file}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if isinstance(text, bytes):
                    text = text.decode("utf-8", errors="replace")
                if text is not None:
                    yield str(text)


def _iter_texts(files: list[Path], max_bytes: int | None, text_field: str, stats: dict) -> Iterator[str]:
    for file in files:
        if max_bytes is not None and stats["bytes"] >= max_bytes:
            return
        stats["files"] += 1
        for text in _documents(file, text_field):
            raw = text.encode("utf-8")
            if max_bytes is not None and stats["bytes"] + len(raw) > max_bytes:
                # Cut the last document so the budget is exact; drop a character split by the cut.
                text = raw[: max_bytes - stats["bytes"]].decode("utf-8", errors="ignore")
                raw = text.encode("utf-8")
                if text:
                    stats["bytes"] += len(raw)
                    stats["documents"] += 1
                    yield text
                return
            if text:
                stats["bytes"] += len(raw)
                stats["documents"] += 1
                yield text


def iter_corpus_texts(
    spec: str | Path | None, max_bytes: int | None = None, text_field: str = "text", stats: dict | None = None
) -> Iterator[str]:
    """Documents of the corpus as strings (empty ones skipped), at most `max_bytes` UTF-8 bytes in all.

    `text_field` names the field (.jsonl) or column (.parquet) holding the text. If `stats` is a dict,
    it is kept up to date with the files opened, bytes and documents yielded so far.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    files = find_corpus_files(spec)  # now, so a bad path fails before any consumer starts
    stats = {} if stats is None else stats
    stats.update(files=0, bytes=0, documents=0)
    return _iter_texts(files, max_bytes, text_field, stats)


def _sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_sidecar(path: Path) -> dict:
    sidecar = _sidecar_path(path)
    if not sidecar.is_file():
        raise FileNotFoundError(f"no sidecar {sidecar} for token file {path} (build it with build_token_file)")
    return json.loads(sidecar.read_text(encoding="utf-8"))


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_token_file(
    spec: str | Path | None,
    tokenizer,
    out_path: str | Path,
    max_bytes: int | None = None,
    progress: bool = True,
    text_field: str = "text",
) -> dict:
    """Tokenize the corpus once into a flat token file plus `<out_path>.json` describing it.

    `tokenizer` needs vocab_size, fingerprint, bos_id, eos_id and encode_batch (dsv2.tokenizer.Tokenizer).
    Each document is written as bos + tokens + eos; a special token's string inside a document stays plain
    text (only these added bos/eos are special ids). uint16 when every id fits (vocab <= 65536), else
    uint32. An existing file is reused when its sidecar records the same source, max_bytes, text field
    and tokenizer (vocab size and fingerprint); the source's contents are not rehashed, so delete the
    file after editing the corpus in place. Returns {files, bytes, documents, tokens, reused, path}.
    """
    out_path = Path(out_path)
    files = find_corpus_files(spec)
    source = f"stdlib:{sysconfig.get_paths()['stdlib']}" if spec is None else os.path.abspath(str(spec))
    key = {
        "source": source,
        "max_bytes": max_bytes,
        "text_field": text_field,
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "tokenizer_hash": tokenizer.fingerprint,
        # special-token strings in documents are encoded as plain text (Tokenizer.encode's default since the
        # chat-format change); files made before, when they became special ids, lack this key and are rebuilt
        "special_token_text": "plain",
    }
    sidecar = _sidecar_path(out_path)
    if out_path.is_file() and sidecar.is_file():
        old = json.loads(sidecar.read_text(encoding="utf-8"))
        size_ok = out_path.stat().st_size == old.get("n_tokens", -1) * np.dtype(old.get("dtype", "u1")).itemsize
        if size_ok and all(old.get(k) == v for k, v in key.items()):
            return {**_stats_of(old), "reused": True, "path": str(out_path)}
    # The sidecar certifies the token file; remove it first so a crash mid-build cannot leave a stale match.
    sidecar.unlink(missing_ok=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    stats: dict = {}
    texts = iter_corpus_texts(spec, max_bytes=max_bytes, text_field=text_field, stats=stats)
    # Progress in bytes; parquet is compressed, so its size on disk says nothing about the text in it.
    total = None
    if not any(f.suffix.lower() == ".parquet" for f in files):
        total = sum(f.stat().st_size for f in files)
        total = min(total, max_bytes) if max_bytes else total
    n_tokens = 0

    def write(f) -> None:
        nonlocal n_tokens
        with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
            for batch in _batches(texts):
                flat: list[int] = []
                for ids in tokenizer.encode_batch(batch):
                    flat.append(bos)
                    flat.extend(ids)
                    flat.append(eos)
                np.asarray(flat, dtype=dtype).tofile(f)
                n_tokens += len(flat)
                bar.update(stats["bytes"] - bar.n)

    _write_atomic(out_path, write)
    if n_tokens == 0:
        out_path.unlink()
        raise ValueError(f"empty corpus: no text in {spec if spec is not None else 'the default corpus'}")
    meta = {
        "dtype": dtype.name,
        "n_tokens": n_tokens,
        "n_docs": stats["documents"],
        "files": stats["files"],
        "bytes": stats["bytes"],
        **key,
    }
    _write_atomic(sidecar, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8")))
    return {**_stats_of(meta), "reused": False, "path": str(out_path)}


def _batches(texts: Iterator[str], max_docs: int = 512, max_chars: int = 1 << 22) -> Iterator[list[str]]:
    # Batches of documents let the Rust tokenizer encode in parallel.
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _stats_of(meta: dict) -> dict:
    return {"files": meta["files"], "bytes": meta["bytes"], "documents": meta["n_docs"], "tokens": meta["n_tokens"]}


class PackedDataset:
    """A token file cut into blocks of seq_len + 1 tokens; the last `val_fraction` of blocks is validation.

    Block i is tokens[i * (seq_len + 1) : (i + 1) * (seq_len + 1)]; inputs are its first seq_len tokens,
    targets its last seq_len. Leftover tokens after the last whole block are unused. Blocks
    0 .. n_train - 1 are for training, n_train .. n_blocks - 1 for validation (at least one when
    val_fraction > 0 and there are two or more blocks).
    """

    def __init__(self, path: str | Path, seq_len: int, val_fraction: float = 0.01):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"token file {path} does not exist")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        meta = _read_sidecar(path)
        self.path, self.seq_len, self.meta = path, seq_len, meta
        block = seq_len + 1
        n_tokens = meta["n_tokens"]
        self.n_blocks = n_tokens // block
        if self.n_blocks == 0:
            raise ValueError(f"{path} holds {n_tokens} tokens, fewer than one block of seq_len + 1 = {block}")
        self.tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(n_tokens,))
        self.blocks = self.tokens[: self.n_blocks * block].reshape(self.n_blocks, block)  # a view, no copy
        n_val = 0
        if val_fraction > 0 and self.n_blocks >= 2:
            n_val = min(self.n_blocks - 1, max(1, round(self.n_blocks * val_fraction)))
        self.n_val = n_val
        self.n_train = self.n_blocks - n_val

    def __len__(self) -> int:
        return self.n_blocks

    def get_batch(self, block_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [len(block_ids), seq_len] int64, for the given block indices."""
        x = torch.from_numpy(self.blocks[np.asarray(block_ids, dtype=np.int64)].astype(np.int64))
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()


class BatchLoader:
    """Training batches over the train blocks, shuffled per epoch, sharded over data-parallel ranks.

    Every rank walks the same global order: epoch e visits the train blocks in the permutation drawn
    from np.random.default_rng((seed, e)) (a seed sequence, so seed 0 epoch 1 and seed 1 epoch 0 differ).
    A global batch of B blocks is the next B of that order (running into the next epoch when the current
    one ends); rank r takes its r-th contiguous slice of B / world_size. So the ranks' slices together
    are exactly the single-process batch, B may change from call to call (batch-size ramp), and the
    state (epoch, position) does not depend on world_size.
    """

    def __init__(
        self, dataset: PackedDataset, batch_size: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng((self.seed, self.epoch)).permutation(self.dataset.n_train)
            self._order_epoch = self.epoch
        return self._order

    def _take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            order = self._epoch_order()
            k = min(n, len(order) - self.position)
            parts.append(order[self.position : self.position + k])
            self.position += k
            n -= k
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)

    def _local_size(self, batch_size: int | None) -> int:
        batch_size = self.batch_size if batch_size is None else batch_size
        if batch_size is None or batch_size <= 0:
            raise ValueError(f"batch size must be a positive integer, got {batch_size}")
        if batch_size % self.world_size:
            raise ValueError(f"global batch size {batch_size} is not divisible by world_size {self.world_size}")
        return batch_size // self.world_size

    def next_batch(self, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of the next global batch of `batch_size` blocks: ([B/ws, T], [B/ws, T]) int64."""
        local = self._local_size(batch_size)
        ids = self._take(local * self.world_size)
        return self.dataset.get_batch(ids[self.rank * local : (self.rank + 1) * local])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:  # training is counted in steps, not epochs
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_train": self.dataset.n_train}

    def load_state_dict(self, state: dict) -> None:
        for name, mine in (("seed", self.seed), ("n_train", self.dataset.n_train)):
            if state[name] != mine:
                raise ValueError(f"cannot resume: saved loader has {name}={state[name]}, this one {mine}")
        self.epoch, self.position = state["epoch"], state["position"]

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The validation blocks in order, in global batches of `batch_size` (the last may be short).

        Each rank gets its contiguous slice of each global batch; in the short last batch a rank may get
        nothing and then yields nothing, so sum losses locally and all-reduce once after the loop.
        """
        if batch_size <= 0:
            raise ValueError(f"batch size must be a positive integer, got {batch_size}")
        ds = self.dataset
        for start in range(ds.n_train, ds.n_blocks, batch_size):
            ids = np.arange(start, min(start + batch_size, ds.n_blocks))
            mine = np.array_split(ids, self.world_size)[self.rank]
            if len(mine):
                yield ds.get_batch(mine)


# ---- synthetic key-value retrieval: needles in a haystack of corpus text ----------------------------------------
# One format for the extension corpus (dsv2 extend --kv-fraction) and the NIAH evaluation (dsv2 eval niah): a
# needle states a random key's value in a Python comment (the default corpus is Python), the question restates
# the needle up to the value, and the answer is the value.
NEEDLE = "\n# The secret number of {key} is {value}.\n"
QUESTION = "\n# The secret number of {key} is"


def random_needle(rng: np.random.Generator) -> tuple[str, str]:
    """A random key (5 lowercase letters) and value (5 digits)."""
    key = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, 5))
    return key, str(int(rng.integers(10000, 100000)))


COPY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
COPY_VOCAB = 256  # distinct tokens copy sequences draw from
COPY_REPEATS = 4  # times each span is written in a copy sequence


@functools.lru_cache(maxsize=8)
def copy_palette(tokenizer, size: int | None = COPY_VOCAB) -> np.ndarray:
    """The token ids copy sequences draw from: each COPY_ALPHABET character's own token (the characters of the
    needles' keys and values), then ordinary tokens of the vocabulary (a fixed seeded draw, special tokens left out)
    up to `size` in all (None: the letters and digits only). Computed once per tokenizer."""
    alphabet = list(dict.fromkeys(tokenizer.encode(c)[0] for c in COPY_ALPHABET))
    if size is None:
        return np.asarray(alphabet, dtype=np.int64)
    special = set(tokenizer.tok.get_added_tokens_decoder()) | {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    others = np.asarray(sorted(set(range(tokenizer.vocab_size)) - special - set(alphabet)))
    if size < len(alphabet) or size > len(alphabet) + len(others):
        raise ValueError(f"copy vocabulary must be {len(alphabet)}..{len(alphabet) + len(others)} tokens "
                         f"(the letters and digits, up to the whole vocabulary), got {size}")
    extra = np.random.default_rng(0).choice(others, size - len(alphabet), replace=False)
    return np.concatenate([np.asarray(alphabet, dtype=np.int64), np.sort(extra).astype(np.int64)])


COPY_SOURCES = ("random", "text", "mixed")  # copy spans: palette tokens, corpus windows, palette spans amid text


def copy_block(tokenizer, length: int, rng: np.random.Generator, min_span: int = 8, max_span: int = 32,
               repeats: int = COPY_REPEATS, vocab: int | None = COPY_VOCAB, text: np.ndarray | None = None,
               n_text: int = 0, mixed: bool = False) -> np.ndarray:
    """One training sequence of `length` token ids that only a model able to look back can predict: bos, then
    random spans (min_span..max_span tokens drawn from copy_palette(tokenizer, vocab)), each written `repeats`
    times in a row. Every repeat is predictable only by finding the current token earlier and copying what followed
    it (the induction pattern behind retrieval, which a small model trained briefly on code lacks); the random span
    lengths leave no fixed offset to attend to.

    Why 4 repeats of 256 tokens by default: with 2 repeats of the 36 letters and digits, 3,000 steps did not form
    the pattern in the demo model (docs/long_context.md). More repeats strengthen the signal (3 of every 4 tokens
    are copies); a larger palette makes the earlier occurrence of a token unambiguous. (3,213 steps of these have not
    formed it in the demo model either: at this size MLA learns the pattern far later than per-head attention,
    `dsv2 ablate copy`, docs/ablations.md section 5.)

    text (with n_text, the tokens of it to draw from): each span is instead a window of that corpus text at a random
    offset (copy source "text"). A model that copies random strings need not copy inside prose or code: one that
    continued 16/16 random spans after random letters continued 0/16 of them inside corpus text
    (docs/long_context.md); spans of text teach the same pattern where retrieval needs it. mixed (copy source
    "mixed", with text): palette spans again, but every occurrence follows a window of 0..max_span corpus tokens, so
    the spans and their repeats sit amid text as a needle does."""
    if repeats < 2:
        raise ValueError(f"a copy sequence needs at least 2 repeats of each span, got {repeats}")
    if text is not None and n_text <= max_span:
        raise ValueError(f"copy spans of up to {max_span} tokens need more text than {n_text} tokens")
    if mixed and text is None:
        raise ValueError("mixed copy sequences need corpus text")
    palette = copy_palette(tokenizer, vocab) if text is None or mixed else None

    def window(n: int) -> list[int]:
        start = int(rng.integers(0, n_text - n))
        return text[start:start + n].astype(np.int64).tolist()

    out = [tokenizer.bos_id]
    while len(out) < length:
        n = int(rng.integers(min_span, max_span + 1))
        span = window(n) if palette is None else palette[rng.integers(0, len(palette), n)].tolist()
        if not mixed:
            out += span * repeats
            continue
        for _ in range(repeats):
            out += window(int(rng.integers(0, max_span + 1))) + span
    return np.asarray(out[:length], dtype=np.int64)


def kv_retrieval_block(tokens: np.ndarray, n_tokens: int, tokenizer, length: int, rng: np.random.Generator,
                       max_needles: int = 4) -> np.ndarray:
    """One training sequence of `length` token ids: bos, a window of corpus text (tokens[:n_tokens]) with 1 to
    max_needles needles at random token offsets, then every needle's question and answer (" value.") in a random
    order. The answers are the retrieval signal; the rest is ordinary language-model text."""
    n = int(rng.integers(1, max_needles + 1))
    pairs = [random_needle(rng) for _ in range(n)]
    needles = tokenizer.encode_batch([NEEDLE.format(key=k, value=v) for k, v in pairs])
    qa = tokenizer.encode_batch([QUESTION.format(key=k) + f" {v}.\n" for k, v in pairs])
    order = rng.permutation(n)
    tail = [t for i in order for t in qa[i]]
    filler_len = length - 1 - sum(map(len, needles)) - len(tail)
    if filler_len < 0 or n_tokens <= filler_len:
        raise ValueError(f"sequence length {length} is too short for {max_needles} needles, or the corpus too small")
    start = int(rng.integers(0, n_tokens - filler_len))
    filler = tokens[start:start + filler_len].astype(np.int64)
    cuts = np.sort(rng.integers(0, filler_len + 1, n))
    parts, prev = [np.array([tokenizer.bos_id])], 0
    for cut, needle in zip(cuts, needles):
        parts += [filler[prev:cut], np.asarray(needle)]
        prev = cut
    parts += [filler[prev:], np.asarray(tail)]
    return np.concatenate(parts).astype(np.int64)
