"""`dsv2 info`: the paper's parameter counts and KV-cache table."""

import json

from dsv2.cli import main
from dsv2.config import ModelConfig
from dsv2.info import kv_cache_table
from dsv2.model import count_parameters


def test_v2_parameter_counts():
    c = count_parameters(ModelConfig.from_preset("v2"))
    assert round(c["total"] / 1e9, 2) == 235.74
    assert 20.5e9 < c["activated"] < 22e9  # the paper's "21B activated"


def test_v2_kv_cache_table_matches_paper():
    rows = {r["mechanism"]: r for r in kv_cache_table(ModelConfig.from_preset("v2"))}
    assert rows["MLA (dsv2)"]["elements_per_token_per_layer"] == 576  # (d_c + d_h^R) = 512 + 64
    assert rows["MHA"]["elements_per_token_per_layer"] == 2 * 128 * 128
    assert rows["MLA (dsv2)"]["bytes_per_token_bf16"] == 576 * 60 * 2
    assert rows["MQA"]["elements_per_token_per_layer"] == 256


def test_info_cli_table_and_json(capsys):
    assert main(["info", "--preset", "v2"]) == 0
    out = capsys.readouterr().out
    assert "235.74B total" in out and "MLA (dsv2)" in out
    assert main(["info", "--preset", "tiny", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"]["total"] == count_parameters(ModelConfig.from_preset("tiny"))["total"]
