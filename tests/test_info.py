"""`dsv2 info`: the paper's parameter counts and KV-cache table."""

import json

import pytest

from dsv2.cli import main
from dsv2.config import ModelConfig
from dsv2.info import kv_cache_table, parameter_counts

# (preset, paper's total, paper's activated, tolerance in billions): DeepSeek-V2 "236B total, 21B activated";
# DeepSeek-V2-Lite "15.7B total, 2.4B activated". The paper leaves out the embedding lookup.
PAPER = [("v2", 236, 21, 0.5), ("v2-lite", 15.7, 2.4, 0.06)]


@pytest.mark.parametrize("preset,total,activated,tol", PAPER)
def test_parameter_counts_match_the_paper(preset, total, activated, tol):
    c = parameter_counts(ModelConfig.from_preset(preset))
    assert abs(c["total"] / 1e9 - total) < tol
    assert abs(c["activated_excluding_embedding"] / 1e9 - activated) < tol
    # the other convention is the same count plus the embedding table, and misses the paper's figure for V2-Lite
    assert c["activated_including_embedding"] - c["activated_excluding_embedding"] == c["embedding"] > 0
    if preset == "v2-lite":
        assert abs(c["activated_including_embedding"] / 1e9 - activated) > tol  # 2.66B, the old headline


def test_exact_v2_counts():
    c = parameter_counts(ModelConfig.from_preset("v2"))
    assert (c["total"], c["activated_excluding_embedding"], c["activated_including_embedding"]) == (
        235_741_434_880, 20_851_512_320, 21_375_800_320)


def test_tied_embeddings_stay_in_the_activated_count():
    c = parameter_counts(ModelConfig.from_preset("tiny", tie_word_embeddings=True))
    assert c["lm_head"] == 0
    assert c["activated_excluding_embedding"] == c["activated_including_embedding"]


def test_v2_kv_cache_table_matches_paper():
    rows = {r["mechanism"]: r for r in kv_cache_table(ModelConfig.from_preset("v2"))}
    assert rows["MLA (dsv2)"]["elements_per_token_per_layer"] == 576  # (d_c + d_h^R) = 512 + 64
    assert rows["MHA"]["elements_per_token_per_layer"] == 2 * 128 * 128
    assert rows["MLA (dsv2)"]["bytes_per_token_bf16"] == 576 * 60 * 2
    assert rows["MQA"]["elements_per_token_per_layer"] == 256


def test_gqa_row_never_has_more_groups_than_heads():
    rows = {r["mechanism"]: r for r in kv_cache_table(ModelConfig.from_preset("small"))}  # 4 heads
    assert "GQA (4 groups)" in rows and "GQA (8 groups)" not in rows
    assert rows["GQA (4 groups)"]["elements_per_token_per_layer"] == rows["MHA"]["elements_per_token_per_layer"]
    assert "GQA (8 groups)" in {r["mechanism"] for r in kv_cache_table(ModelConfig.from_preset("v2"))}


def test_info_cli_table_and_json(capsys):
    assert main(["info", "--preset", "v2-lite"]) == 0
    out = capsys.readouterr().out
    assert "15.71B total, 2.45B activated per token (the paper's convention" in out
    assert "2.66B activated with the embedding table" in out and "MLA (dsv2)" in out
    assert main(["info", "--preset", "v2", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)["parameters"]
    assert "activated" not in p  # no key that leaves the convention open
    assert (p["total"], p["activated_excluding_embedding"], p["activated_including_embedding"]) == (
        235_741_434_880, 20_851_512_320, 21_375_800_320)


def test_output_into_a_closed_pipe_ends_quietly():
    """`dsv2 info ... | head`: a reader that is gone is no traceback and no error exit (`true` closes the pipe
    before dsv2 writes, so the write always fails)."""
    import subprocess
    import sys

    proc = subprocess.run(f"{sys.executable} -m dsv2.cli info --preset v2 | true; echo ${{PIPESTATUS[0]}}",
                          shell=True, capture_output=True, text=True, executable="/bin/bash")
    assert proc.stdout.strip() == "0" and proc.stderr == ""
