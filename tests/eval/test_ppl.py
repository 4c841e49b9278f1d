"""dsv2 eval ppl: bucketing by hand, the per-position mean over sequences, and the CLI (JSON + plot)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dsv2.checkpoint import load_checkpoint
from dsv2.cli import main
from dsv2.eval.ppl import bucket_losses, document_sequences, position_losses


def test_buckets_average_their_positions():
    per_pos = torch.tensor([1.0, 3.0, 2.0, 4.0, 10.0, 0.0, 7.0], dtype=torch.float64)
    got = bucket_losses(per_pos, 3)
    assert [(b["start"], b["end"]) for b in got] == [(0, 3), (3, 6), (6, 7)]
    assert [b["loss"] for b in got] == [2.0, 14.0 / 3, 7.0]
    assert got[0]["ppl"] == pytest.approx(math.exp(2.0))
    with pytest.raises(ValueError):
        bucket_losses(per_pos, 0)


def test_position_losses_average_each_position_over_sequences(tiny_checkpoint, tokenizer):
    model = load_checkpoint(tiny_checkpoint)
    seqs = document_sequences(tokenizer, 40, 5)
    assert seqs.shape == (5, 41) and (seqs[:, 0] == tokenizer.bos_id).all()
    got = position_losses(model, seqs, batch_size=2, progress=False)
    # one sequence at a time, position by position
    want = torch.zeros(40, dtype=torch.float64)
    with torch.no_grad():
        for s in seqs:
            logits = model(s[None, :-1])[0]
            for t in range(40):
                want[t] += F.cross_entropy(logits[t:t + 1], s[t + 1:t + 2]).double() / len(seqs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cli_writes_buckets_and_plot(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "ppl"
    assert main(["eval", "ppl", "--model", str(tiny_checkpoint), "--seq-len", "64", "--bucket", "16",
                 "--sequences", "3", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "ppl.json").read_text())
    assert res["sequences"] == 3 and [b["start"] for b in res["buckets"]] == [0, 16, 32, 48]
    assert (out / "ppl.png").stat().st_size > 1000
    (tmp_path / "short.txt").write_text("x = 1\n")
    assert main(["eval", "ppl", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "short.txt"),
                 "--seq-len", "64"]) == 2
    assert "has 65 tokens" in capsys.readouterr().err
