"""`dsv2 ablate`: the variants' parameter counts against hand formulas, the load statistics, and the study runner on
a tiny corpus for a few steps writing its table and plots."""

import json
import math

import pytest
import torch

from dsv2.ablate import Scale, base_model, induction_step, load_stats, split_variant, study_variants
from dsv2.cli import main
from dsv2.config import ModelConfig
from dsv2.info import parameter_counts


def _cfg(study, name, s=Scale(), vocab=1000):
    model_overrides, _ = split_variant(study_variants(study, s)[name])
    return ModelConfig.from_preset("tiny", **{**base_model(s, vocab), **model_overrides})


@pytest.mark.parametrize("hidden", [64, 128])
def test_moe_variants_activated_and_total_parameters(hidden):
    """Hand formula: everything outside the FFNs (embedding excluded) + per layer the FFN a token runs: dense
    3 h I, or the shared experts + k routed experts (3 h m each) + the router (E x h). DeepSeekMoE, GShard-top2 and
    the dense FFN activate the same 24 h m (m = h / 4) FFN weights; the two MoEs hold the same 32 experts' worth."""
    s = Scale(hidden_size=hidden)
    h, m, L, V = hidden, hidden // 4, s.layers, 1000
    dh = h // s.heads
    dr = dh // 2
    attn = h * s.heads * (dh + dr) + h * (4 * dh + dr) + 4 * dh + 4 * dh * s.heads * 2 * dh + s.heads * dh * h
    outside = V * h + L * (attn + 2 * h) + h  # lm_head, attention and norms, final norm
    ffn_active = 3 * h * 8 * m
    want = {"DeepSeekMoE": (outside + L * ffn_active + (L - 1) * 30 * h,
                            outside + ffn_active + (L - 1) * (3 * h * m * 32 + 30 * h)),
            "GShard-top2": (outside + L * ffn_active + (L - 1) * 8 * h,
                            outside + ffn_active + (L - 1) * (3 * h * 4 * m * 8 + 8 * h)),
            "Dense": (outside + L * ffn_active, outside + L * ffn_active)}
    for name, (activated, total) in want.items():
        p = parameter_counts(_cfg("moe", name, s, V))
        assert p["activated_excluding_embedding"] == activated, name
        assert p["total"] - p["embedding"] == total, name


def test_attention_variants_share_everything_but_attention():
    s = Scale()
    counts = {n: parameter_counts(_cfg("attention", n, s)) for n in study_variants("attention", s)}
    ffn = {n: [r["ffn"] for r in c["layers"]] for n, c in counts.items()}
    assert all(f == ffn["MLA"] for f in ffn.values())
    h, H, dh, dr = s.hidden_size, s.heads, s.hidden_size // s.heads, s.hidden_size // s.heads // 2
    for name, G in (("MHA", H), ("GQA-2", 2), ("MQA", 1)):
        assert counts[name]["layers"][0]["attention"] == h * H * (dh + dr) + h * G * (2 * dh + dr) + H * dh * h


def test_load_stats_against_hand_values():
    even = torch.full((2, 8), 5.0)
    assert load_stats(even) == pytest.approx((1.0, 1.0))
    one_hot = torch.tensor([[8.0, 0, 0, 0]])  # everything on one expert: max/mean 4, entropy 0
    assert load_stats(one_hot) == pytest.approx((4.0, 0.0), abs=1e-9)
    half = torch.tensor([[1.0, 1, 0, 0]])  # two of four: max/mean 2, entropy log 2 / log 4
    assert load_stats(half) == pytest.approx((2.0, 0.5))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly zebras".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g).tolist())
             for _ in range(900)]
    (d / "text.txt").write_text("\n".join(lines))
    return d / "text.txt"


TINY = ["--hidden-size", "16", "--layers", "2", "--heads", "2", "--steps", "4", "--batch-size", "4", "--seq-len",
        "16", "--evals", "2", "--eval-blocks", "8", "--warmup-steps", "1", "--no-progress", "--vocab-size", "300"]


def test_routing_study_writes_table_and_plots(tmp_path, corpus, capsys):
    out = tmp_path / "routing"
    assert main(["ablate", "routing", "--out", str(out), "--data", str(corpus), "--seeds", "0,1", *TINY]) == 0
    report = json.loads((out / "ablation.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["device-limited", "unrestricted"]
    for r in rows.values():
        assert r["seeds"] == [0, 1] and len(r["eval_loss_per_seed"]) == 2
        assert math.isfinite(r["eval_loss"]) and r["eval_ppl"] == pytest.approx(
            sum(math.exp(v) for v in r["eval_loss_per_seed"]) / 2)
        assert r["kv_bytes_per_token_bf16"] == 2 * 2 * (4 * 8 + 4)  # layers x bf16 x (latent 4 d_h + rope)
        assert 1.0 <= r["load_max_over_mean"] <= 32 and 0 < r["load_entropy"] <= 1
    # device-limited routing never sends a token to more than M = 3 groups; unrestricted top-6 of 8 groups does
    assert rows["device-limited"]["share_over_M_groups"] == 0.0
    assert rows["unrestricted"]["share_over_M_groups"] > 0.0
    runs = report["runs"]["unrestricted"]
    assert [r["seed"] for r in runs] == [0, 1] and runs[0]["eval_loss"] != runs[1]["eval_loss"]
    assert len(runs[0]["eval_curve"]) == 3  # step 0, then every 2 steps
    table = (out / "table.md").read_text()
    assert "| device-limited |" in table and "tokens > M groups" in table
    for png in ("loss.png", "expert_load.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # a rerun reads the finished runs instead of training them again
    before = (out / "runs" / "unrestricted-seed0" / "metrics.jsonl").read_text()
    assert main(["ablate", "routing", "--out", str(out), "--data", str(corpus), "--seeds", "0", *TINY]) == 0
    assert (out / "runs" / "unrestricted-seed0" / "metrics.jsonl").read_text() == before
    again = json.loads((out / "ablation.json").read_text())["runs"]["unrestricted"]
    assert again == runs[:1]  # the same measurements, train tokens/s included
    assert "held-out loss" in capsys.readouterr().out


@pytest.mark.slow
def test_attention_study_runs_a_variant_and_plots_loss_against_cache(tmp_path, corpus):
    out = tmp_path / "attention"
    assert main(["ablate", "attention", "--out", str(out), "--data", str(corpus), "--seeds", "3",
                 "--variants", "MQA,MLA", *TINY]) == 0
    rows = {r["variant"]: r for r in json.loads((out / "ablation.json").read_text())["rows"]}
    assert rows["MQA"]["kv_bytes_per_token_bf16"] == 2 * 2 * (8 + 4 + 8)  # 1 KV head: key (8 + 4) + value 8
    assert (out / "loss_vs_kv.png").is_file()
    cfg = ModelConfig.from_hf(next((out / "runs" / "MQA-seed3" / "checkpoints").iterdir()))
    assert cfg.attention_type == "mqa"


def test_user_mistakes_are_one_line_errors(tmp_path, corpus, capsys):
    assert main(["ablate", "moe", "--out", str(tmp_path / "x"), "--variants", "Switch"]) == 2
    assert main(["ablate", "moe", "--out", str(tmp_path / "x"), "--seeds", "a"]) == 2
    assert main(["ablate", "moe", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "nope")]) == 2
    assert main(["ablate", "moe", "--out", str(tmp_path / "x"), "--hidden-size", "30"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 4 and "Traceback" not in err and "Switch" in err


def test_induction_step_is_the_first_logged_step_below_halfway():
    """Halfway between uniform guessing (ln 256 = 5.545) and a perfect copier (about ln 256 / repeats): 3.466 for 4
    repeats, 4.159 for 2 (hand values)."""
    curve = [(0, 5.6), (10, 5.0), (20, 3.48), (30, 3.45), (40, 1.5), (50, 3.6)]
    assert induction_step(curve, 4, 256) == 30
    assert induction_step(curve[:3], 4, 256) is None
    assert induction_step([(5, 4.17), (6, 4.15)], 2, 256) == 6


def test_copy_study_trains_on_copying_and_reports_the_copy_check(tmp_path, corpus, monkeypatch, capsys):
    """The copy study: every variant dense in every layer, trained on copy sequences only; its table reports the
    copy loss, the induction step and the copy check (run on the run's final checkpoint) instead of held-out loss."""
    import dsv2.ablate as ablate_mod
    from dsv2.checkpoint import load_checkpoint
    from dsv2.infer.generate import generate

    seen = []

    def spy(tokenizer, gen, trials):
        seen.append((tokenizer, gen, trials))
        return 0.625

    monkeypatch.setattr(ablate_mod, "copy_check", spy)
    out = tmp_path / "copy"
    assert main(["ablate", "copy", "--out", str(out), "--data", str(corpus), "--seeds", "0", "--variants",
                 "MLA,MHA,MLA-frozen-latents,MLA-narrow-frozen-latents", *TINY]) == 0
    report = json.loads((out / "ablation.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["MLA", "MHA", "MLA-frozen-latents", "MLA-narrow-frozen-latents"] and len(seen) == 4
    for name, row in rows.items():
        run = out / "runs" / f"{name}-seed0"
        ckpt = next((run / "checkpoints").iterdir())
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["recipe"]["copy_fraction"] == 1.0 and state["recipe"]["copy_repeats"] == 4
        cfg = ModelConfig.from_hf(ckpt)
        assert cfg.first_k_dense_replace == cfg.num_hidden_layers == 2  # attention alone differs
        assert cfg.attention_type == name.split("-")[0].lower()
        # the frozen-latents variants' recipe reaches their runs: 40% of the 4 steps
        assert state["recipe"]["freeze_latents"] == (2 if "frozen" in name else 0)
        # the latent: 4 d_h (V2's ratio), the narrow variant's d_h
        if name.startswith("MLA"):
            head_dim = cfg.hidden_size // cfg.num_attention_heads
            assert cfg.kv_lora_rank == head_dim * (1 if "narrow" in name else 4)
        losses = [json.loads(line)["lm_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                  if "lm_loss" in json.loads(line)]
        tail = losses[-max(1, len(losses) // 10):]
        assert row["copy_loss"] == pytest.approx(sum(tail) / len(tail))
        assert row["copy_check"] == 0.625 and row["induction_step_per_seed"] == [None]
        assert "eval_loss" not in row
    # the check ran on each run's final model: its generate function is that checkpoint's greedy continuation
    tok, gen, trials = seen[1]  # MHA's
    model = load_checkpoint(next((out / "runs" / "MHA-seed0" / "checkpoints").iterdir()), dtype=torch.float32)
    prompt = [[0, 5, 6, 7, 8]]
    assert gen(prompt) == generate(model.eval(), prompt, max_new_tokens=8) and trials == 32
    table = (out / "table.md").read_text()
    assert "copy check" in table and "| 0.62 |" in table and "not reached" in table and "held-out" not in table
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "copy check 0.62" in capsys.readouterr().out
    # a run whose result was lost after its last checkpoint is measured again without training; its speed is the
    # one it logged
    (out / "runs" / "MHA-seed0" / "result.json").unlink()
    assert main(["ablate", "copy", "--out", str(out), "--data", str(corpus), "--seeds", "0", "--variants", "MHA",
                 *TINY]) == 0
    speeds = [json.loads(line)["tokens_per_s"] for line in
              (out / "runs" / "MHA-seed0" / "metrics.jsonl").read_text().splitlines() if "tokens_per_s" in line]
    again = json.loads((out / "runs" / "MHA-seed0" / "result.json").read_text())
    assert again["tokens_per_s"] == pytest.approx(sum(speeds) / len(speeds))
    assert again["copy_loss"] == rows["MHA"]["copy_loss"]
