"""`dsv2 demo`: a shortened run of the real thing (small preset, stdlib corpus, tokenizer trained on it), then the
full demo as a slow test."""

import pytest

from dsv2.cli import main
from dsv2.demo import PROMPT, run_demo


def test_demo_short(tmp_path, capsys):
    s = run_demo(tmp_path, progress=False, sample_tokens=8, max_steps=2, max_bytes=300_000, seq_len=64,
                 batch_size=4, eval_batches=1)
    out = capsys.readouterr().out
    assert s["step"] == 2 and s["steps_run"] == 2
    assert PROMPT in out and "continuation" in out and "held-out loss by step: 0:" in out
    assert (tmp_path / "checkpoints" / "step-00000002" / "model.safetensors").is_file()
    assert (tmp_path / "loss.png").is_file()
    # again: the finished run is reused, not retrained
    s = run_demo(tmp_path, progress=False, sample_tokens=4, max_steps=2, max_bytes=300_000, seq_len=64,
                 batch_size=4, eval_batches=1)
    assert s["steps_run"] == 0 and "already holds a run trained to step 2" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_full(tmp_path, capsys):
    """The `make demo` run: the held-out loss falls from ln(4096) = 8.3 to well under 5."""
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    evals = [float(part.split(": ")[1]) for part in out.split("held-out loss by step: ")[1].splitlines()[0].split("  ")]
    assert evals[0] > 8.0 and evals[-1] < 5.0
