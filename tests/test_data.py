"""Tests for dsv2.data: corpus discovery, token file, packing, shuffling, resume and rank sharding."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa  # a declared dependency (parquet corpora): its absence must fail, not skip
import pyarrow.parquet as pq
import pytest
import torch

from dsv2.data import (
    BatchLoader,
    PackedDataset,
    build_token_file,
    find_corpus_files,
    iter_corpus_texts,
)


class ByteTokenizer:
    """Token id = byte + 3 (0, 1, 2 are bos, eos, pad): makes the expected token stream easy to write."""

    bos_id, eos_id = 0, 1

    def __init__(self, vocab_size=259):
        self.vocab_size = vocab_size
        self.fingerprint = f"bytes-{vocab_size}"

    def encode(self, text):
        return [b + 3 for b in text.encode("utf-8")]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


def stream(docs, tok=ByteTokenizer()):
    return [i for d in docs for i in (tok.bos_id, *tok.encode(d), tok.eos_id)]


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.md").write_text("# title\nbody", encoding="utf-8")
    (root / "a.txt").write_text("first document", encoding="utf-8")
    (root / "sub" / "c.py").write_text("print('hi')\n", encoding="utf-8")
    (root / "sub" / "skip.bin").write_bytes(b"\x00\x01")
    (root / ".hidden" / "d.txt").write_text("tooling, not corpus", encoding="utf-8")
    return root


def make_token_file(tmp_path, docs, vocab_size=259, name="tokens.bin"):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out = tmp_path / name
    build_token_file(src, ByteTokenizer(vocab_size), out, progress=False)
    return out


def test_find_files_dir_glob_file(corpus):
    assert find_corpus_files(corpus) == [corpus / "a.txt", corpus / "b.md", corpus / "sub" / "c.py"]
    assert find_corpus_files(str(corpus / "**" / "*.py")) == [corpus / "sub" / "c.py"]
    assert find_corpus_files(corpus / "a.txt") == [corpus / "a.txt"]
    assert list(iter_corpus_texts(corpus)) == ["first document", "# title\nbody", "print('hi')\n"]


def test_find_files_errors(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_corpus_files(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no files match"):
        find_corpus_files(str(tmp_path / "*.nothing"))
    with pytest.raises(ValueError, match="unsupported"):
        find_corpus_files(corpus / "sub" / "skip.bin")
    only_hidden = tmp_path / "only_hidden"
    (only_hidden / ".git").mkdir(parents=True)
    (only_hidden / ".git" / "notes.txt").write_text("tooling", encoding="utf-8")
    (only_hidden / "data.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(ValueError, match="no .txt"):
        find_corpus_files(only_hidden)
    with pytest.raises(ValueError, match="max_bytes"):
        iter_corpus_texts(corpus, max_bytes=0)


def test_jsonl_and_parquet(tmp_path):
    rows = [{"text": "one", "body": "uno"}, {"text": "two 二", "body": "dos"}, {"text": None, "body": ""}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    pq.write_table(pa.table({"text": ["three", "four 🤖", None], "n": [1, 2, 3]}), tmp_path / "b.parquet")
    stats = {}
    texts = list(iter_corpus_texts(tmp_path, stats=stats))
    assert texts == ["one", "two 二", "three", "four 🤖"]
    assert stats == {"files": 2, "bytes": sum(len(t.encode()) for t in texts), "documents": 4}
    assert list(iter_corpus_texts(tmp_path / "a.jsonl", text_field="body")) == ["uno", "dos"]
    with pytest.raises(ValueError, match="no column 'body'"):
        list(iter_corpus_texts(tmp_path / "b.parquet", text_field="body"))
    (tmp_path / "bad.jsonl").write_text('{"other": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:1: no field 'text'"):
        list(iter_corpus_texts(tmp_path / "bad.jsonl"))


def test_max_bytes_is_exact(tmp_path):
    (tmp_path / "a.txt").write_text("abcdef", encoding="utf-8")
    (tmp_path / "b.txt").write_text("中文字", encoding="utf-8")  # 3 bytes per character
    (tmp_path / "c.txt").write_text("never read", encoding="utf-8")
    stats = {}
    assert list(iter_corpus_texts(tmp_path, max_bytes=11, stats=stats)) == ["abcdef", "中"]  # cut mid-char
    assert stats == {"files": 2, "bytes": 9, "documents": 2}
    assert list(iter_corpus_texts(tmp_path, max_bytes=4)) == ["abcd"]


def test_default_corpus_is_stdlib():
    files = find_corpus_files(None)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 100 and files == sorted(files)
    assert all(f.suffix == ".py" and f.stat().st_size <= 1 << 20 for f in files)
    assert all(stdlib in f.parents for f in files)
    parts = {p for f in files for p in f.relative_to(stdlib).parts[:-1]}
    assert not parts & {"site-packages", "test", "tests", "idle_test"}
    assert stdlib / "json" / "__init__.py" in files
    stats = {}
    assert "".join(iter_corpus_texts(None, max_bytes=1000, stats=stats))
    assert stats["bytes"] == 1000


def test_token_file_stream_and_sidecar(tmp_path):
    docs = ["hello", "wörld", "x" * 40]
    out = make_token_file(tmp_path, docs)
    meta = json.loads((tmp_path / "tokens.bin.json").read_text())
    assert meta["dtype"] == "uint16" and meta["n_tokens"] == len(stream(docs)) and meta["n_docs"] == 3
    assert meta["tokenizer_vocab_size"] == 259 and meta["source"] == str(tmp_path / "docs.jsonl")
    assert np.fromfile(out, dtype=np.uint16).tolist() == stream(docs)
    assert not list(tmp_path.glob("*.tmp*"))  # atomic write left no temp file behind


def test_token_file_uint32_for_large_vocab(tmp_path):
    out = make_token_file(tmp_path, ["abc"], vocab_size=70000)
    assert json.loads((tmp_path / "tokens.bin.json").read_text())["dtype"] == "uint32"
    assert np.fromfile(out, dtype=np.uint32).tolist() == stream(["abc"])


def test_token_file_reuse_and_rebuild(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("some text", encoding="utf-8")
    out = tmp_path / "t.bin"
    first = build_token_file(src, ByteTokenizer(), out, progress=False)
    assert not first["reused"] and first["tokens"] == 11 and first["documents"] == 1 and first["files"] == 1
    again = build_token_file(src, ByteTokenizer(), out, progress=False)
    assert again["reused"] and again["tokens"] == 11
    assert not build_token_file(src, ByteTokenizer(), out, max_bytes=4, progress=False)["reused"]
    assert np.fromfile(out, dtype=np.uint16).tolist() == stream(["some"])
    assert not build_token_file(src, ByteTokenizer(300), out, max_bytes=4, progress=False)["reused"]
    out.write_bytes(b"\x00\x00")  # truncated file: the sidecar no longer certifies it
    assert not build_token_file(src, ByteTokenizer(300), out, max_bytes=4, progress=False)["reused"]


def test_token_file_with_real_tokenizer(tmp_path):
    from dsv2.tokenizer import train_tokenizer

    docs = ["Hello 世界 🤖", "def f():\n    return 42\n"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    tok = train_tokenizer(docs * 5, vocab_size=300)
    stats = build_token_file(tmp_path / "d.jsonl", tok, tmp_path / "t.bin", progress=False)
    expected = [i for d in docs for i in (tok.bos_id, *tok.encode(d), tok.eos_id)]
    assert np.fromfile(tmp_path / "t.bin", dtype=np.uint16).tolist() == expected
    assert stats["tokens"] == len(expected)


def test_empty_corpus_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty corpus"):
        build_token_file(tmp_path / "empty.txt", ByteTokenizer(), tmp_path / "t.bin", progress=False)
    assert not (tmp_path / "t.bin").exists()


def test_packing_blocks_follow_the_stream(tmp_path):
    docs = ["ab", "cdef", "g", "hijklmn", "op"]
    flat = stream(docs)  # 26 tokens
    ds = PackedDataset(make_token_file(tmp_path, docs), seq_len=4, val_fraction=0.0)
    assert (ds.n_blocks, ds.n_train, ds.n_val) == (5, 5, 0)  # 26 // 5, one leftover token unused
    inputs, targets = ds.get_batch([0, 1, 2, 3, 4])
    assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == (5, 4)
    for i in range(5):
        block = flat[i * 5 : (i + 1) * 5]
        assert inputs[i].tolist() == block[:-1] and targets[i].tolist() == block[1:]
    # Documents flow across block boundaries: block 0 ends inside "cdef", block 1 carries on from it.
    assert inputs[0].tolist() == [0, ord("a") + 3, ord("b") + 3, 1]
    assert targets[0].tolist()[-1] == 0 and inputs[1].tolist()[0] == ord("c") + 3


def test_val_split(tmp_path):
    path = make_token_file(tmp_path, ["x" * 98])  # 100 tokens
    assert PackedDataset(path, seq_len=9, val_fraction=0.1).n_val == 1  # 10 blocks
    assert PackedDataset(path, seq_len=9, val_fraction=0.2).n_val == 2
    assert PackedDataset(path, seq_len=9, val_fraction=0.001).n_val == 1  # at least one block
    assert PackedDataset(path, seq_len=49, val_fraction=0.001).n_val == 1  # 2 blocks -> 1 + 1
    one = PackedDataset(path, seq_len=60, val_fraction=0.5)  # 1 block: nothing to hold out
    assert (one.n_train, one.n_val) == (1, 0)
    with pytest.raises(ValueError, match="fewer than one block"):
        PackedDataset(path, seq_len=100)
    with pytest.raises(ValueError, match="val_fraction"):
        PackedDataset(path, seq_len=9, val_fraction=1.0)
    (tmp_path / "bare.bin").write_bytes(b"\x00" * 8)
    with pytest.raises(FileNotFoundError, match="sidecar"):
        PackedDataset(tmp_path / "bare.bin", seq_len=2)
    with pytest.raises(FileNotFoundError):
        PackedDataset(tmp_path / "missing.bin", seq_len=2)


@pytest.fixture
def indexed(tmp_path):
    # Every block distinct (a counter stream), so rows map back to block indices unambiguously.
    out = tmp_path / "idx.bin"
    n_blocks, block = 40, 4
    np.arange(n_blocks * block, dtype=np.uint16).tofile(out)
    meta = {"dtype": "uint16", "n_tokens": n_blocks * block}
    (tmp_path / "idx.bin.json").write_text(json.dumps(meta))
    return PackedDataset(out, seq_len=3, val_fraction=0.1)


def rows(inputs):
    return [int(r[0]) // 4 for r in inputs]  # block index of each row in the counter stream


def test_shuffle_is_deterministic_and_covers_each_epoch(indexed):
    assert (indexed.n_train, indexed.n_val) == (36, 4)
    a = [rows(BatchLoader(indexed, 12, seed=7).next_batch()[0])]
    b = [rows(BatchLoader(indexed, 12, seed=7).next_batch()[0])]
    c = [rows(BatchLoader(indexed, 12, seed=8).next_batch()[0])]
    assert a == b and a != c
    loader = BatchLoader(indexed, 12, seed=7)
    epoch0 = [i for _ in range(3) for i in rows(loader.next_batch()[0])]
    epoch1 = [i for _ in range(3) for i in rows(loader.next_batch()[0])]
    assert sorted(epoch0) == sorted(epoch1) == list(range(36))  # train blocks only, each once
    assert epoch0 != epoch1 and loader.state_dict()["epoch"] == 2
    x, y = BatchLoader(indexed, 2).next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_resume_gives_identical_batches(indexed):
    sizes = [4, 8, 8, 16, 16, 16, 32, 32]  # a batch-size ramp that crosses epoch boundaries
    loader = BatchLoader(indexed, seed=3)
    for b in sizes[:4]:
        loader.next_batch(b)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON round trip (checkpoint files)
    expected = [loader.next_batch(b) for b in sizes[4:]]
    resumed = BatchLoader(indexed, seed=3)
    resumed.load_state_dict(state)
    for b, (x, y) in zip(sizes[4:], expected):
        rx, ry = resumed.next_batch(b)
        assert torch.equal(rx, x) and torch.equal(ry, y)
    with pytest.raises(ValueError, match="seed"):
        BatchLoader(indexed, seed=4).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_union_is_global_batch(indexed, world_size):
    single = BatchLoader(indexed, seed=1)
    ranks = [BatchLoader(indexed, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    for b in [4, 8, 12, 24, 40]:
        x, y = single.next_batch(b)
        parts = [loader.next_batch(b) for loader in ranks]
        assert all(p[0].shape == (b // world_size, 3) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="divisible"):
        ranks[0].next_batch(6 if world_size == 4 else 3)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(indexed, rank=world_size, world_size=world_size)


def test_val_batches(indexed):
    batches = list(BatchLoader(indexed).val_batches(3))
    assert [rows(x) for x, _ in batches] == [[36, 37, 38], [39]]
    shards = [list(BatchLoader(indexed, rank=r, world_size=2).val_batches(3)) for r in range(2)]
    assert [rows(x) for x, _ in shards[0]] == [[36, 37], [39]]
    assert [rows(x) for x, _ in shards[1]] == [[38]]  # nothing left for rank 1 in the short last batch
