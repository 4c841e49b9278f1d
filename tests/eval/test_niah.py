"""dsv2 eval niah: prompt construction (exact length, needle at its depth), exact-retrieval scoring on answers
forced right or wrong, the grid, and the CLI end to end on the Engine (JSON + heat map)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from dsv2.cli import main
from dsv2.data import copy_palette
from dsv2.eval.niah import build_trials, copy_check, digits_right, filler_tokens, retrieved, run_niah

NEEDLE_RE = re.compile(r"# The secret number of (\w+) is (\d+)\.")


def _needle_value(tokenizer, prompt: list[int]) -> str:
    """Read the needle's value back out of the prompt text (independently of how the prompt was built)."""
    text = tokenizer.decode(prompt)
    (key, value), = NEEDLE_RE.findall(text)
    assert text.rstrip().endswith(f"# The secret number of {key} is")  # the question asks for that key
    return value


def test_prompts_have_the_exact_length_and_the_needle_at_its_depth(tokenizer):
    filler = filler_tokens(tokenizer, 2000)
    trials = build_trials(tokenizer, [100, 300], [0, 50, 100], 2, filler, seed=1)
    assert len(trials) == 2 * 3 * 2
    for t in trials:
        assert len(t.prompt) == t.length and t.prompt[0] == tokenizer.bos_id
        assert _needle_value(tokenizer, t.prompt) == t.value
        # tokens before the needle, found by decoding ever longer prefixes, as a share of the filler
        fact = f"# The secret number of {t.key} is {t.value}."
        end = next(i for i in range(len(t.prompt)) if fact in tokenizer.decode(t.prompt[:i]))
        tail = len(tokenizer.encode(f"\n{fact}\n")) + len(tokenizer.encode(f"\n# The secret number of {t.key} is"))
        share = (end - len(tokenizer.encode(f"\n{fact}\n")) - 1) / (t.length - 1 - tail)
        assert share == pytest.approx(t.depth / 100, abs=0.03), (t.depth, share)


@pytest.mark.parametrize("answer,value,ok", [
    (" 12345.", "12345", True), ("12345", "12345", True), ("\n 12345 is", "12345", True),
    (" 12346.", "12345", False), (" 123456", "12345", False), (" x 12345", "12345", False), ("", "12345", False),
    (" 1234", "12345", False),
])
def test_exact_retrieval_scoring(answer, value, ok):
    assert retrieved(answer, value) is ok


@pytest.mark.parametrize("answer,value,share", [
    (" 12345.", "12345", 1.0), (" 12395.", "12345", 0.8), (" 23451.", "12345", 0.0), (" 123", "12345", 0.6),
    (" 1234567", "12345", 1.0), (" x 12345", "12345", 0.0), ("", "12345", 0.0), ("\n 02340", "12345", 0.6),
])
def test_digit_scoring_gives_partial_credit_in_place(answer, value, share):
    assert digits_right(answer, value) == pytest.approx(share)


def test_grid_scores_forced_right_and_wrong_answers(tokenizer):
    def right_in_first_half(prompts):  # a "model" that retrieves only needles placed in the first half
        out = []
        for p in prompts:
            value = _needle_value(tokenizer, p)
            text = tokenizer.decode(p)
            first_half = text.index(f"is {value}.") < len(text) / 2
            answer = value if first_half else value[:3] + str(9 - int(value[3])) + str(9 - int(value[4]))
            out.append(tokenizer.encode(f" {answer}.\n"))
        return out

    res = run_niah(tokenizer, right_in_first_half, lengths=[120, 240], depths=[0, 25, 75, 100], trials=3)
    assert res["accuracy"] == [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    assert res["mean"] == {"120": 0.5, "240": 0.5}
    assert sum(t["correct"] for t in res["trials"]) == 2 * 2 * 3
    # the wrong answers keep the first 3 of 5 digits (9 - d never equals d)
    assert res["digit_accuracy"] == [[1.0, 1.0, 0.6, 0.6], [1.0, 1.0, 0.6, 0.6]]
    assert res["digit_mean"] == {"120": pytest.approx(0.8), "240": pytest.approx(0.8)}


def test_copy_check_scores_a_copier_and_a_model_that_does_not_look_back(tokenizer):
    def induction(prompts):  # find the prompt's last 4 tokens earlier in it and continue as it continued there
        out = []
        for p in prompts:
            at = next(i for i in range(len(p) - 4) if p[i:i + 4] == p[-4:])
            out.append(p[at + 4:at + 12])
        return out

    def repeat_last(prompts):
        return [[p[-1]] * 8 for p in prompts]

    assert copy_check(tokenizer, induction, trials=12) == 1.0
    assert copy_check(tokenizer, repeat_last, trials=12) == 0.0
    half = iter(range(10**6))
    assert copy_check(tokenizer, lambda ps: [induction([p])[0] if next(half) % 2 else [] for p in ps],
                      trials=12) == 0.5
    # inside text: the span comes after `text` filler tokens and its repeat after `text` more
    filler = filler_tokens(tokenizer, 2000)
    seen = []
    assert copy_check(tokenizer, lambda ps: (seen.extend(ps), induction(ps))[1], trials=12, filler=filler) == 1.0
    assert all(len(p) == 1 + 48 + 16 + 48 + 4 for p in seen)
    assert all(any(p[1:49] == filler[i:i + 48].tolist() for i in range(len(filler) - 48)) for p in seen[:3])

    def plain_only(prompts):  # copies only when the span follows bos directly: the model of docs/long_context.md
        return [induction([p])[0] if set(p[1:5]) <= alphabet else [] for p in prompts]

    alphabet = set(copy_palette(tokenizer, None).tolist())
    assert copy_check(tokenizer, plain_only, trials=12) == 1.0
    assert copy_check(tokenizer, plain_only, trials=12, filler=filler) == 0.0


def test_cli_runs_the_grid_on_the_engine(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "niah"
    assert main(["eval", "niah", "--model", str(tiny_checkpoint), "--lengths", "64,128", "--depths", "0,100",
                 "--trials", "2", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "niah.json").read_text())
    assert res["lengths"] == [64, 128] and res["depths"] == [0, 100] and len(res["trials"]) == 8
    assert 0.0 <= res["copy_accuracy"] <= 1.0 and 0.0 <= res["copy_in_text_accuracy"] <= 1.0
    assert [len(row) for row in res["digit_accuracy"]] == [2, 2] and set(res["digit_mean"]) == {"64", "128"}
    printed = capsys.readouterr().out
    assert "copy check:" in printed and "copy check inside text:" in printed and "\ndigits  " in printed
    assert (out / "niah.png").stat().st_size > 1000
    assert main(["eval", "niah", "--model", str(tiny_checkpoint), "--lengths", "250"]) == 2
    assert "leave no room to answer" in capsys.readouterr().err
