"""SFT: the loss is the token mean over assistant tokens (checked against unpadded per-row forwards), exact resume,
line-numbered data errors, refusal of data with nothing to learn."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dsv2.checkpoint import load_checkpoint
from dsv2.cli import main
from dsv2.tokenizer import Tokenizer
from dsv2.train.run import latest_checkpoint
from dsv2.train.sft import SFTRecipe, sft
from dsv2.train.synthetic import arithmetic_tasks, sft_rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def data(tmp_path):
    rows = sft_rows(arithmetic_tasks(5, seed=0))
    # multi-turn, a system turn, and the {"prompt", "completion"} form
    rows.append({"messages": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "1+1?"},
                              {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"},
                              {"role": "assistant", "content": "#### 4"}]})
    rows.append({"prompt": "3+3?", "completion": "6"})
    return write_jsonl(tmp_path / "sft.jsonl", rows)


def recipe(base, data, **kw):
    args = dict(init_from=str(base), data=str(data), seq_len=192, batch_size=7, max_steps=1, val_fraction=0,
                log_every=1, eval_every=100, save_every=100, lr=1e-3, warmup_steps=1)
    return SFTRecipe(**{**args, **kw})


def test_first_step_loss_is_the_token_mean_over_assistant_tokens(base, data, tmp_path):
    # batch = every row, so step 1 sees them all; micro-batches of 3 rows of different lengths, padded
    sft(recipe(base, data, micro_batch_size=3), tmp_path / "run", progress=False)
    logged = next(r for r in metrics(tmp_path / "run") if "lm_loss" in r)["lm_loss"]
    model, tok = load_checkpoint(base).eval(), Tokenizer.load(base)
    total, n = 0.0, 0
    for line in data.read_text().splitlines():
        row = json.loads(line)
        msgs = row.get("messages") or [{"role": "user", "content": row["prompt"]},
                                       {"role": "assistant", "content": row["completion"]}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=False)
        # targets by hand: each assistant turn is what follows its generation prompt up to and including the eos
        target = torch.zeros(len(ids), dtype=torch.bool)
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                start = len(tok.apply_chat_template(msgs[:i], add_generation_prompt=True))
                end = len(tok.apply_chat_template(msgs[:i + 1], add_generation_prompt=False))
                assert ids[end - 1] == tok.eos_id
                target[start:end] = True
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, :-1]  # one row, no padding
        y = torch.tensor(ids[1:])
        total += F.cross_entropy(logits, y, reduction="none")[target[1:]].sum().item()
        n += int(target[1:].sum())
    assert logged == pytest.approx(total / n, rel=1e-5)


@pytest.mark.slow
def test_resume_is_exact(base, data, tmp_path):
    r = recipe(base, data, batch_size=3, micro_batch_size=2, max_steps=3, val_fraction=0.2, eval_every=2)
    sft(r, tmp_path / "straight", progress=False)
    assert sft(r, tmp_path / "resumed", stop_after=1, progress=False)["stopped_by"] == "stop_after"
    sft(r, tmp_path / "resumed", resume=True, progress=False)
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in x.items() if k not in drop} for x in a] == \
           [{k: v for k, v in x.items() if k not in drop} for x in b]
    assert any("eval_token_accuracy" in x for x in a)
    wa = load_file(latest_checkpoint(tmp_path / "straight") / "model.safetensors")
    wb = load_file(latest_checkpoint(tmp_path / "resumed") / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_epochs_set_the_number_of_steps(base, data, tmp_path):
    sft(recipe(base, data, epochs=2, batch_size=2, val_fraction=0.3, max_steps=1000), tmp_path, stop_after=1,
        progress=False)
    state = json.loads((latest_checkpoint(tmp_path) / "trainer_state.json").read_text())
    assert state["recipe"]["max_steps"] == math.ceil(2 * 4 / 2)  # 7 rows, ceil(0.3 * 7) = 3 held out


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"text": "hello"}', 'expected "messages" or "prompt" and "completion"'),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0] must be"),
    ('{"messages": [{"role": "user", "content": 3}]}', "messages[0] must be"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant message"),
    ('{"prompt": "q", "completion": null}', '"completion" must be a string'),
])
def test_malformed_line_is_reported_with_its_number(base, tmp_path, capsys, line, message):
    good = json.dumps({"prompt": "q", "completion": "a"})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    code = main(["sft", "--init-from", str(base), "--data", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {path}:3: ") and message in err and "Traceback" not in err


def test_data_without_assistant_tokens_is_refused_before_training(base, tmp_path):
    long = [{"prompt": "word " * 400, "completion": "answer"}] * 3  # the answer lies beyond seq_len
    path = write_jsonl(tmp_path / "long.jsonl", long)
    with pytest.raises(ValueError, match="no assistant tokens"):
        sft(recipe(base, path), tmp_path / "run", progress=False)
    assert latest_checkpoint(tmp_path / "run") is None
    with pytest.raises(ValueError, match="data is required"):
        sft(dataclasses.replace(recipe(base, path), data=None), tmp_path / "run2", progress=False)
