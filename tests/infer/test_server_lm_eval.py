"""lm-evaluation-harness's `local-completions` backend against a live server, on the tiny local tasks
(tests/fixtures/lm_tasks: multiple choice = log-likelihoods through echo + logprobs, and generation): the scores
equal those of `dsv2 eval lm` (lm-eval's DSV2LM model class on the same checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")  # the eval extra
from lm_eval.tasks import TaskManager  # noqa: E402

from dsv2.eval.lm import DSV2LM  # noqa: E402
from test_server import Server  # noqa: E402

TASKS = Path(__file__).resolve().parents[1] / "fixtures" / "lm_tasks"


def _scores(results: dict) -> dict:
    return {(task, metric): value for task, res in results["results"].items()
            for metric, value in res.items() if metric.split(",")[0] in ("acc", "acc_norm", "exact_match")}


@pytest.mark.slow
def test_local_completions_scores_equal_dsv2_eval_lm(tiny_checkpoint):
    tasks = ["dsv2_tiny_mc", "dsv2_tiny_gen"]
    ours = lm_eval.simple_evaluate(model=DSV2LM.from_dir(tiny_checkpoint, batch_size=4, progress=False),
                                   tasks=tasks, task_manager=TaskManager(include_path=str(TASKS)), log_samples=True)
    s = Server(tiny_checkpoint, names=["tiny"])
    try:
        served = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"model=tiny,base_url={s.url}/v1/completions,tokenizer={tiny_checkpoint},"
                       f"tokenizer_backend=huggingface,tokenized_requests=True,add_bos_token=True,num_concurrent=1,"
                       f"max_retries=1,max_length={s.engine.max_model_len}",
            tasks=tasks, task_manager=TaskManager(include_path=str(TASKS)), log_samples=True)
    finally:
        s.stop()
    a, b = _scores(ours), _scores(served)
    print("dsv2 eval lm:", a, "\nlocal-completions:", b)
    assert a and a.keys() == b.keys()
    assert a == pytest.approx(b, abs=1e-9), (a, b)
    # per document: each choice's log-likelihood and greedy flag, each generated text
    for task in tasks:
        ra = [x["filtered_resps"] for x in sorted(ours["samples"][task], key=lambda x: x["doc_id"])]
        rb = [x["filtered_resps"] for x in sorted(served["samples"][task], key=lambda x: x["doc_id"])]
        assert len(ra) == len(rb) > 0
        for x, y in zip(ra, rb):
            if task == "dsv2_tiny_mc":
                assert [g for _, g in x] == [g for _, g in y]
                assert [ll for ll, _ in x] == pytest.approx([ll for ll, _ in y], abs=1e-3)
            else:
                assert x == y
