"""Tests for dsv2.train.rewards: answer extraction and checking, format and safety rules, weighted sums, the
sandbox (passing code scores, runaway / memory bomb / fork / early exit score 0 and are killed), reward specs."""

import os
import time

import pytest
import torch

from dsv2.train import rewards
from dsv2.train.rewards import (answers_match, extract_answer, extract_code, parse_rewards, run_sandboxed, score)


@pytest.mark.parametrize("text, want", [
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### 5\nwait, no\n#### 12", "12"),  # the last one
    (r"the answer is $\boxed{\frac{3}{4}}$", r"\frac{3}{4}"),  # nested braces kept
    (r"\boxed{1} then \boxed{2}", "2"),
    (r"#### 9 but \boxed{10}", "10"),  # \boxed wins over ####
    ("no answer here", None),
])
def test_extract_answer(text, want):
    assert (extract_answer(text) if want is None else extract_answer(text).strip()) == want


@pytest.mark.parametrize("pred, ref, ok", [
    ("7", "7", True), (" 7. ", "7", True), ("1,234", "1234", True), ("$12$", "12", True), ("0.75", "3/4", True),
    (r"\frac{3}{4}", "0.75", True), ("3.50", "3.5", True), (r"\text{12}", "12", True), ("-4", "-4", True),
    ("8", "7", False), ("", "0", False), ("seven", "7", False), ("7/0", "7", False), ("12", "1,2", False),
])
def test_answers_match(pred, ref, ok):
    assert answers_match(pred, ref) is ok


def test_math_format_safety_and_weighted_sum():
    rows = [{"answer": "9"}, {"answer": "9"}, {"answer": "4", "forbidden": ["secret"]}, {"answer": "4"}]
    comps = ["7 + 2 = 9\n#### 9", "#### 8", r"it is \boxed{4}, the secret", "run rm -rf / now\n#### 4\nmore"]
    src = parse_rewards(["math", "format:0.5", "safety:2"])
    total, per = score(src, rows, comps)
    assert per["math"].tolist() == [1, 0, 1, 1]
    assert per["format"].tolist() == [1, 1, 0, 0]  # text after the answer breaks the format
    assert per["safety"].tolist() == [1, 1, 0, 0]  # the row's own patterns, else the built-in ones
    torch.testing.assert_close(total, torch.tensor([1 + 0.5 + 2, 0.5 + 2, 1.0, 1.0]))
    with pytest.raises(ValueError, match="answer"):
        score(parse_rewards(["math"]), [{}], ["#### 1"])


def test_parse_rewards_errors_and_registry():
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        parse_rewards(["nope"])
    with pytest.raises(ValueError, match="not a number"):
        parse_rewards(["math:high"])
    with pytest.raises(ValueError, match="twice"):
        parse_rewards(["math", "math:2"])
    with pytest.raises(FileNotFoundError, match="reward model directory"):
        parse_rewards(["rm:/no/such/dir:0.5"])
    rewards.register("const")(lambda arg: lambda rows, comps: [0.25] * len(comps))
    (s,) = parse_rewards(["const:4"])
    assert (s.name, s.weight) == ("const", 4.0) and score([s], [{}], ["x"])[0].tolist() == [1.0]


def test_extract_code():
    assert extract_code("hi\n```python\ndef f(): return 1\n```\nand\n```py\ndef f(): return 2\n```") == \
        "def f(): return 2\n"
    assert extract_code("def f(): return 3") == "def f(): return 3"


# ---- the sandbox ------------------------------------------------------------------------------------------------
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]


def test_sandbox_scores_passing_tests():
    assert run_sandboxed("def add(a, b):\n    return a + b\n", TESTS) == pytest.approx(2 / 3)
    assert run_sandboxed("def add(a, b):\n    return abs(a) + b\n", TESTS) == pytest.approx(1 / 3)
    assert run_sandboxed("syntax error(", TESTS) == 0.0
    # code reward over completions: the last fenced block is the candidate, each row has its tests
    fn = parse_rewards(["code"])[0].fn
    assert fn([{"tests": TESTS}] * 2, ["```python\ndef add(a, b): return a + b\n```", "no code"]) == \
        pytest.approx([2 / 3, 0.0])


@pytest.mark.parametrize("code", [
    "import os\nos._exit(0)",  # exits 0 before any test runs
    "import sys\nsys.exit(0)",
    "import os, sys\nprint('\\nfake 1 1')\nsys.stdout.flush()\nos._exit(0)",  # a result line without the nonce
])
def test_sandbox_early_exit_scores_zero(code):
    assert run_sandboxed(code, ["assert True"]) == 0.0


def test_sandbox_kills_runaway_candidates(tmp_path):
    t = time.perf_counter()
    assert run_sandboxed("def add(a, b): return a + b\nwhile True:\n    pass\n", TESTS, timeout=1.5) == 0.0
    assert run_sandboxed("import time\ntime.sleep(60)", TESTS, timeout=1.0) == 0.0  # wall clock, not CPU
    assert time.perf_counter() - t < 15
    # 600 MB is harmless to this machine: only the address-space limit makes the candidate fail
    assert run_sandboxed("x = bytearray(600 * 1024 ** 2)\ndef add(a, b): return a + b", TESTS, timeout=20,
                         memory_mb=256) == 0.0
    assert run_sandboxed("x = bytearray(8 * 1024 ** 3)\ndef add(a, b): return a + b", TESTS) == 0.0
    assert run_sandboxed("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 ** 2))", TESTS) == 0.0


def test_sandbox_blocks_forks(tmp_path):
    marker = tmp_path / "forked"
    os.chmod(tmp_path, 0o777)  # writable by the sandbox's user either way: only a fork can stop the child writing
    fork = (f"import os\npid = os.fork()\nif pid == 0:\n    open({str(marker)!r}, 'w').write('x')\n    os._exit(0)\n"
            "os.waitpid(pid, 0)\ndef add(a, b): return a + b\n")
    assert run_sandboxed(fork, TESTS) == 0.0 and not marker.exists()
    bomb = "import os\nwhile True:\n    os.fork()"
    assert run_sandboxed(bomb, TESTS, timeout=2) == 0.0
    # the candidate can catch the refusal and go on: the fork still did not happen
    caught = fork.replace("pid = os.fork()", "try:\n    pid = os.fork()\nexcept OSError:\n    pid = -1") \
        .replace("os.waitpid(pid, 0)", "pass")
    assert run_sandboxed(caught, TESTS) == pytest.approx(2 / 3) and not marker.exists()


def test_rm_source_scores_with_the_reward_model(tmp_path):
    """rm:DIR loads the reward model once and scores (the row's prompt, the completion's assistant content)."""
    from dsv2.config import ModelConfig
    from dsv2.model import DeepseekV2
    from dsv2.tokenizer import train_tokenizer
    from dsv2.train.rm import RewardModel, chat_ids

    tok = train_tokenizer(["Ada has 3 pens. How many? 3 + 4 = 7\n#### 7"] * 20, 300)
    torch.manual_seed(0)
    body = DeepseekV2(ModelConfig.from_preset("tiny", vocab_size=300))
    head = torch.nn.Linear(body.config.hidden_size, 1, bias=False)
    RewardModel(body, head, tok).save(tmp_path / "rm")
    (src,) = parse_rewards([f"rm:{tmp_path / 'rm'}:0.5"])
    assert (src.name, src.weight) == ("rm_rm", 0.5)
    rows = [{"prompt": "Ada has 3 pens."}, {"messages": [{"role": "user", "content": "How many?"}]}]
    got = src.fn(rows, [" 3 + 4 = 7\n#### 7", " #### 9"])  # decoded after "Assistant:": a leading space
    rm = RewardModel.load(tmp_path / "rm")
    want = [rm.score_ids([chat_ids(tok, "Ada has 3 pens.", "3 + 4 = 7\n#### 7")]).item(),
            rm.score_ids([chat_ids(tok, "How many?", "#### 9")]).item()]
    assert got == pytest.approx(want, rel=1e-5) and got[0] != got[1]
