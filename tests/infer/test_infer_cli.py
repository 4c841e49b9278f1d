"""`dsv2 generate / chat / quantize` end to end on a tiny checkpoint (serve is covered by test_server.py)."""

import io
import json
import re

import pytest
from safetensors import safe_open

from dsv2 import load_checkpoint
from dsv2.cli import main
from dsv2.infer.engine import Engine, SamplingParams
from dsv2.model.fp8 import is_fp8
from dsv2.tokenizer import Tokenizer


def _greedy_text(ckpt, prompt_ids, n):
    model = load_checkpoint(ckpt)
    tok = Tokenizer.load(ckpt)
    out = Engine(model, num_blocks=64, eos_token_id=tok.eos_id).generate([prompt_ids], SamplingParams(max_tokens=n))
    return tok.decode(out[0].token_ids)


def test_generate(tiny_checkpoint, capsys):
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "def add(a, b):", "--max-tokens", "10",
                 "--kv-cache-memory", "1MB"]) == 0
    out, err = capsys.readouterr()
    tok = Tokenizer.load(tiny_checkpoint)
    assert out == _greedy_text(tiny_checkpoint, tok.encode("def add(a, b):", add_bos=True), 10) + "\n"
    assert "tok/s" in err


def test_chat_reads_turns_until_eof(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nhow are you?\n"))
    args = ["chat", "--model", str(tiny_checkpoint), "--max-tokens", "6", "--temperature", "0",
            "--system", "Be brief.", "--kv-cache-memory", "1MB"]
    assert main(args) == 0
    out, _ = capsys.readouterr()
    tok = Tokenizer.load(tiny_checkpoint)
    second = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "how are you?"}])  # after /reset
    assert _greedy_text(tiny_checkpoint, second, 6) in out


def test_quantize_writes_a_deepseek_fp8_checkpoint(tiny_checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "fp8"
    assert main(["quantize", "--model", str(tiny_checkpoint), "--out", str(out_dir)]) == 0
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert (out_dir / "tokenizer.json").is_file() and (out_dir / "tokenizer_config.json").is_file()
    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_a_proj.weight_scale_inv" in set(f.keys())
    assert is_fp8(load_checkpoint(out_dir))
    capsys.readouterr()
    assert main(["generate", "--model", str(out_dir), "--prompt", "x = ", "--max-tokens", "4", "--stop", "\x00",
                 "--kv-cache-memory", "1MB", "--kv-cache-dtype", "int8"]) == 0
    assert re.search(r"\[\d+ tokens", capsys.readouterr().err)  # runs end to end on FP8 weights, int8 cache


def test_a_pool_smaller_than_the_context_sets_the_context(tiny_checkpoint, capsys):
    """A KV pool that holds fewer tokens than the model's context (512): the served context becomes what the pool
    holds (else every request asking for the rest of the context would be refused), and an explicit
    --max-model-len above it is an error that says what to change."""
    base = ["generate", "--model", str(tiny_checkpoint), "--prompt", "x = ", "--kv-cache-memory", "120KB"]
    assert main(base + ["--max-model-len", "512"]) == 2
    assert "more than the KV cache pool holds" in capsys.readouterr().err
    assert main(base + ["--max-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"the context is \d+ tokens", err) and "3 tokens" in err


def test_quantize_never_replaces_what_is_at_out(tiny_checkpoint, tmp_path, capsys):
    """--out holding a run (or anything) or being a file is refused before anything is written (it used to be
    moved aside and deleted)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    afile = tmp_path / "afile"
    afile.write_text("hi")
    for out in (run, afile):
        assert main(["quantize", "--model", str(tiny_checkpoint), "--out", str(out)]) == 2
        assert "exists and is not empty" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == "{}\n" and (run / "checkpoints").is_dir()
    assert afile.read_text() == "hi"


@pytest.mark.parametrize("flags,msg", [
    (["--block-size", "0"], "argument --block-size: 0 is not in 1.."),  # argparse's usage error
    (["--threads", "-2"], "argument --threads: -2 is not in 1.."),
    (["--max-model-len", "0"], "argument --max-model-len: 0 is not in 1.."),
    (["--device", "bogus"], "is not a device"),
])
def test_bad_engine_flags_exit_2(tiny_checkpoint, flags, msg, capsys):
    try:
        code = main(["generate", "--model", str(tiny_checkpoint), "--prompt", "x", *flags])
    except SystemExit as e:
        code = e.code
    assert code == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["generate", "--model", "/nonexistent", "--prompt", "x"], "checkpoint directory not found"),
    (["quantize", "--model", "/nonexistent", "--out", "/tmp/x"], "not found"),
])
def test_user_errors_exit_2(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err
