"""dsv2 eval lm: the lm-eval model class against lm-eval's own HF backend (transformers' DeepseekV2 on the same
checkpoint) on the tiny local tasks (tests/fixtures/lm_tasks: multiple choice, generation, rolling
log-likelihood), request by request; and the one-line error when lm-eval is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import lm_eval
import pytest
from lm_eval.tasks import TaskManager

from dsv2.cli import main
from dsv2.eval.lm import DSV2LM

TASKS = Path(__file__).parents[1] / "fixtures" / "lm_tasks"
NAMES = ["dsv2_tiny_mc", "dsv2_tiny_gen", "dsv2_tiny_ppl"]


def _run(model, **kw):
    return lm_eval.simple_evaluate(model=model, tasks=NAMES, task_manager=TaskManager(include_path=str(TASKS)),
                                   log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                   fewshot_random_seed=0, **kw)


@pytest.fixture(scope="module")
def hf_results(tiny_checkpoint):
    return _run("hf", model_args=f"pretrained={tiny_checkpoint},dtype=float32", device="cpu", batch_size=4)


@pytest.mark.slow  # lm-eval's HF backend on transformers' DeepseekV2 (its Python loop over experts)
def test_scores_equal_the_hf_backend_request_by_request(tiny_checkpoint, hf_results):
    ours = _run(DSV2LM.from_dir(tiny_checkpoint, batch_size=3, progress=False))
    for task in NAMES:
        a, b = ours["samples"][task], hf_results["samples"][task]
        assert len(a) == len(b) > 0
        for x, y in zip(sorted(a, key=lambda s: s["doc_id"]), sorted(b, key=lambda s: s["doc_id"])):
            for rx, ry in zip(x["resps"], y["resps"]):
                if task == "dsv2_tiny_gen":
                    assert rx == ry  # the generated text, cut at the stop string
                elif task == "dsv2_tiny_mc":
                    assert rx[0][0] == pytest.approx(ry[0][0], rel=1e-4, abs=1e-4) and rx[0][1] == ry[0][1]
                else:  # rolling: one log-likelihood per document
                    assert rx[0] == pytest.approx(ry[0], rel=1e-4)
        for metric, value in hf_results["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
    # the generation task really produced text (not an empty-string agreement)
    assert any(s["resps"][0][0] for s in ours["samples"]["dsv2_tiny_gen"])


def test_rolling_windows_cover_long_documents(tiny_checkpoint):
    """A document longer than the model's window is scored in disjoint windows: the total equals one long forward
    when the window holds it all, and every token is scored exactly once either way."""
    lm = DSV2LM.from_dir(tiny_checkpoint, batch_size=2, progress=False)
    text = "def f(x):\n    return x * 2 + 1\n" * 12
    n = len(lm.tok_encode(text))

    class Req:
        args = (text,)

    whole = lm.loglikelihood_rolling([Req()])[0]
    lm._max_length = n // 3  # force three or four windows
    windowed = lm.loglikelihood_rolling([Req()])[0]
    assert whole < 0 and windowed < 0 and windowed != pytest.approx(whole, rel=1e-6)  # less context, other value
    lm._max_length = n + 1
    assert lm.loglikelihood_rolling([Req()])[0] == pytest.approx(whole, rel=1e-6)


def test_missing_lm_eval_is_a_one_line_error(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    assert main(["eval", "lm", "--model", str(tiny_checkpoint), "--tasks", "dsv2_tiny_mc"]) == 2
    assert capsys.readouterr().err == "error: lm-eval is not installed; install the extra: pip install dsv2[eval]\n"
