"""The synthetic arithmetic suite: answers checked by re-reading the story, splits disjoint, files written."""

import json
import re

import pytest

from dsv2.cli import main
from dsv2.train.synthetic import arithmetic_tasks, preference_pairs

_NUMBER = r"(\d+)"


def story_answer(prompt: str) -> int:
    """Re-read the story independently of the generator: the start count, then each event sentence."""
    sentences = re.split(r"(?<=\.) ", prompt)
    value = int(re.match(r"\w+ has (\d+) ", sentences[0]).group(1))
    for s in sentences[1:-1]:
        k = int(re.search(_NUMBER, s).group(1))
        if "times as many" in s:
            value *= k
        elif re.search(r"\b(buys|finds|gets|wins)\b", s):
            value += k
        else:
            assert re.search(r"\b(gives|loses|sells)\b", s), s
            value -= k
    return value


def test_answers_follow_from_the_story_and_the_worked_solution():
    for steps in (1, 2, 3):
        for t in arithmetic_tasks(200, seed=3, steps=steps):
            assert t["answer"] == str(story_answer(t["prompt"]))
            lines = t["solution"].split("\n")
            assert lines[-1] == f"#### {t['answer']}"
            assert len(lines) == steps + 2  # start line, one equation per event, the answer line
            for eq in lines[1:-1]:
                a, op, b, _, r = eq.split(" ")
                assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(r)
                assert 0 <= int(r) <= 999


def test_splits_are_disjoint_and_deterministic():
    train = arithmetic_tasks(1500, seed=0)
    test_a, test_b = arithmetic_tasks(150, seed=0, split="test"), arithmetic_tasks(150, seed=7, split="test")
    prompts = {t["prompt"] for t in train}
    assert len(prompts) == 1500
    assert not prompts & {t["prompt"] for t in test_a + test_b}
    assert arithmetic_tasks(50, seed=0) == train[:50]  # a prefix: the same stream
    assert arithmetic_tasks(50, seed=1) != train[:50]


def test_knobs_change_difficulty():
    small = arithmetic_tasks(300, seed=0, max_number=5)
    big = arithmetic_tasks(300, seed=0, steps=3, max_number=50)
    assert max(int(t["answer"]) for t in small) <= 15
    assert any("*" in t["solution"] for t in big)
    assert not any("*" in t["solution"] for t in arithmetic_tasks(300, seed=0, steps=2))
    with pytest.raises(ValueError, match="split"):
        arithmetic_tasks(1, 0, split="val")
    with pytest.raises(ValueError, match="distinct"):
        arithmetic_tasks(10_000, 0, steps=1, max_number=2)


def test_preference_pairs_reject_a_wrong_or_unformatted_solution():
    pairs = preference_pairs(300, seed=2)
    tasks = arithmetic_tasks(300, seed=2)
    assert [p["prompt"] for p in pairs] == [t["prompt"] for t in tasks]
    kinds = set()
    for p, t in zip(pairs, tasks):
        assert p["chosen"] == t["solution"]
        final = re.search(r"#### (-?\d+)$", p["rejected"])
        assert final is None or final.group(1) != t["answer"]
        kinds.add("unformatted" if final is None else "bare" if p["rejected"].startswith("####") else "slip")
    assert kinds == {"unformatted", "bare", "slip"}


def test_cli_writes_the_four_files(tmp_path, capsys):
    assert main(["tasks", "arithmetic", "--out", str(tmp_path), "--n-train", "20", "--n-test", "5",
                 "--seed", "4"]) == 0
    rows = {f: [json.loads(x) for x in (tmp_path / f).read_text().splitlines()]
            for f in ("sft.jsonl", "prompts_train.jsonl", "prompts_test.jsonl", "pairs.jsonl")}
    assert [len(r) for r in rows.values()] == [20, 20, 5, 20]
    first = rows["sft.jsonl"][0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert first[0]["content"] == rows["prompts_train.jsonl"][0]["prompt"]
    assert first[1]["content"].endswith("#### " + rows["prompts_train.jsonl"][0]["answer"])
    assert set(rows["pairs.jsonl"][0]) == {"prompt", "chosen", "rejected"}
    assert main(["tasks", "arithmetic", "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "error: steps" in capsys.readouterr().err
    afile = tmp_path / "afile"  # a path in the way is a user mistake: one error line, exit 2, no traceback
    afile.write_text("x")
    assert main(["tasks", "arithmetic", "--out", str(afile)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_terse_fraction_drops_the_working_from_that_share_of_sft_solutions(tmp_path, capsys):
    assert main(["tasks", "arithmetic", "--out", str(tmp_path), "--n-train", "400", "--n-test", "5",
                 "--terse-fraction", "0.6"]) == 0
    sft = [json.loads(x)["messages"] for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    tasks = arithmetic_tasks(400, seed=0)
    terse = 0
    for messages, t in zip(sft, tasks):
        got, lines = messages[1]["content"], t["solution"].split("\n")
        if got != t["solution"]:
            assert got == f"{lines[0]}\n#### {t['answer']}"  # who starts with what, then the answer: no equations
            terse += 1
    assert 0.5 < terse / 400 < 0.7
    prompts = [json.loads(x) for x in (tmp_path / "prompts_train.jsonl").read_text().splitlines()]
    assert prompts == [{"prompt": t["prompt"], "answer": t["answer"]} for t in tasks]  # prompts untouched
    assert main(["tasks", "arithmetic", "--out", str(tmp_path), "--terse-fraction", "1.5"]) == 2
    assert "terse_fraction must be in [0, 1]" in capsys.readouterr().err
