"""Needle in a haystack: can the model retrieve one fact from anywhere in its context window?

    dsv2 eval niah --model runs/ext/checkpoints/step-00000060 --lengths 256,512,1024,2048 --out runs/ext/niah

The standard grid (the paper's figure 4): for each context length L and needle depth d (0% = the start of the
context, 100% = just before the question), `trials` prompts of exactly L tokens: bos, filler text from the embedded
corpus (the Python standard library sources, data.py) cut at a random offset, a needle sentence stating a random
key's 5-digit value (data.py NEEDLE) inserted d% of the way into the filler, then the question (data.py QUESTION).
All prompts run batched on the Engine with greedy decoding; a trial counts as retrieved when the first number the
model writes is exactly the value. Partial credit, for models that retrieve part of a value: the share of its digits
the answer has right in place (`digit_accuracy`; chance is 0.1 a digit). Writes niah.json (both tables and every
trial) and niah.png (heat map: depth x length, accuracy 0-1).

It also runs a copy check (`copy_check`): can the model continue a random string it has already seen in the prompt?
Retrieval is that skill plus a key to find; a model that fails it (the demo model, trained briefly on code) cannot
retrieve at any length, and the check says so, so a zero grid is not mistaken for a context-length problem. The
same check inside corpus text (copy_in_text_accuracy) is the one retrieval needs: a model can pass the first and
fail the second.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dsv2.data import NEEDLE, QUESTION, copy_block, iter_corpus_texts, random_needle

DEFAULT_DEPTHS = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100)


@dataclass
class Trial:
    length: int
    depth: int  # percent
    key: str
    value: str
    prompt: list[int]
    answer: str = ""  # what the model wrote
    correct: bool = False
    digits: float = 0.0  # share of the value's digits the answer has right in place


def filler_tokens(tokenizer, n_tokens: int, corpus: str | None = None) -> np.ndarray:
    """The first n_tokens (or more) tokens of the corpus (None: the embedded stdlib sources), documents joined."""
    out: list[int] = []
    for text in iter_corpus_texts(corpus):
        out += tokenizer.encode(text)
        if len(out) >= n_tokens:
            break
    if len(out) < n_tokens:
        raise ValueError(f"the corpus holds only {len(out)} tokens; {n_tokens} are needed for the filler")
    return np.asarray(out, dtype=np.int64)


def build_trials(tokenizer, lengths: list[int], depths: list[int], trials: int, filler: np.ndarray,
                 seed: int = 0) -> list[Trial]:
    """The prompts of the grid, each exactly `length` tokens (see the module docstring)."""
    rng = np.random.default_rng(seed)
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key, value = random_needle(rng)
                needle, question = tokenizer.encode_batch([NEEDLE.format(key=key, value=value),
                                                           QUESTION.format(key=key)])
                n = length - 1 - len(needle) - len(question)
                if n < 0:
                    raise ValueError(f"context length {length} is shorter than the needle and the question")
                start = int(rng.integers(0, len(filler) - n + 1))
                hay = filler[start:start + n].tolist()
                at = round(depth / 100 * n)
                prompt = [tokenizer.bos_id] + hay[:at] + needle + hay[at:] + question
                out.append(Trial(length, depth, key, value, prompt))
    return out


def retrieved(answer: str, value: str) -> bool:
    """Exact retrieval: the first number in the answer (leading spaces allowed, nothing else before it) is value."""
    return first_number(answer) == value


def first_number(answer: str) -> str | None:
    """The digits of the answer's first number when only spaces come before it, else None."""
    m = re.match(r"\s*(\d+)", answer)
    return m.group(1) if m else None


def digits_right(answer: str, value: str) -> float:
    """Partial retrieval: the share of value's digits that the answer's first number (read as retrieved() reads
    it) has at the same place; a missing or shorter number scores its missing places as wrong."""
    return sum(a == b for a, b in zip(first_number(answer) or "", value)) / len(value)


def engine_generate(engine, max_tokens: int, progress: bool = True) -> Callable[[list[list[int]]], list[list[int]]]:
    """A generate function on the Engine: greedy, all prompts queued at once (batched as the pool allows)."""
    from dsv2.infer.engine import SamplingParams

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        ids = [engine.add_request(p, params) for p in prompts]
        out: dict[str, list[int]] = {i: [] for i in ids}
        with tqdm(total=len(ids), desc="niah", unit="prompt", disable=not progress) as bar:
            while engine.has_work():
                for o in engine.step():
                    out[o.request_id] += o.token_ids
                    if o.finished:
                        bar.update(1)
        return [out[i] for i in ids]

    return generate


def run_niah(tokenizer, generate: Callable[[list[list[int]]], list[list[int]]], lengths: list[int],
             depths: list[int] = DEFAULT_DEPTHS, trials: int = 4, seed: int = 0, corpus: str | None = None) -> dict:
    """Build the grid, answer every prompt with `generate` (prompts -> generated token ids), score it.
    Returns {"lengths", "depths", "accuracy": [[per depth] per length], "mean": {length: accuracy},
    "digit_accuracy" and "digit_mean" (the same for digits_right), "trials": [...]}."""
    lengths, depths = sorted(set(lengths)), sorted(set(depths))
    if not lengths or min(lengths) < 1 or not depths or min(depths) < 0 or max(depths) > 100 or trials < 1:
        raise ValueError("need lengths >= 1, depths in 0..100 and trials >= 1")
    filler = filler_tokens(tokenizer, 2 * max(lengths), corpus)
    cases = build_trials(tokenizer, lengths, depths, trials, filler, seed)
    for case, ids in zip(cases, generate([c.prompt for c in cases])):
        case.answer = tokenizer.decode(ids)
        case.correct = retrieved(case.answer, case.value)
        case.digits = digits_right(case.answer, case.value)

    def grid(score: str) -> list[list[float]]:
        return [[float(np.mean([getattr(c, score) for c in cases if c.length == n and c.depth == d]))
                 for d in depths] for n in lengths]

    acc, dig = grid("correct"), grid("digits")
    return {"lengths": lengths, "depths": depths, "trials_per_cell": trials, "accuracy": acc,
            "mean": {str(n): float(np.mean(row)) for n, row in zip(lengths, acc)}, "digit_accuracy": dig,
            "digit_mean": {str(n): float(np.mean(row)) for n, row in zip(lengths, dig)},
            "trials": [{k: v for k, v in asdict(c).items() if k != "prompt"} for c in cases]}


def copy_check(tokenizer, generate: Callable[[list[list[int]]], list[list[int]]], trials: int = 16,
               span: int = 16, shown: int = 4, expect: int = 8, seed: int = 0, filler: np.ndarray | None = None,
               text: int = 48) -> float:
    """Can the model copy from its context at all? Share of `trials` prompts, bos + a random span of `span` letters
    and digits (data.py copy_block) + the span's first `shown` tokens, whose greedy continuation starts with the
    span's next `expect` tokens. Retrieval needs this (the induction pattern: find the current tokens earlier,
    copy what followed); a model near 0 here scores 0 on every needle whatever its context length.

    filler (corpus tokens): the same inside text, as retrieval needs it: `text` filler tokens (at a random offset)
    before the span and `text` more between the span and its repeat. A model can pass the plain check and fail
    this one (docs/long_context.md: copying learned on random strings alone did not carry over to text)."""
    rng = np.random.default_rng(seed)
    blocks = [copy_block(tokenizer, 1 + 2 * span, rng, span, span, repeats=2, vocab=None).tolist()
              for _ in range(trials)]
    prompts, truths = [], []
    for b in blocks:
        first, repeat = b[1:1 + span], b[1 + span:]
        before = between = []
        if filler is not None:
            at = int(rng.integers(0, len(filler) - 2 * text))
            before, between = filler[at:at + text].tolist(), filler[at + text:at + 2 * text].tolist()
        prompts.append([b[0]] + before + first + between + repeat[:shown])
        truths.append(repeat[shown:shown + expect])
    outs = generate(prompts)
    return float(np.mean([list(o[:expect]) == t for o, t in zip(outs, truths)]))


def plot_niah(result: dict, path: str | Path, title: str = "needle in a haystack") -> None:
    """Heat map like the paper's figure 4: needle depth (rows) x context length (columns), green = retrieved."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.asarray(result["accuracy"]).T  # [depths, lengths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(result["lengths"]), 0.6 + 0.3 * len(result["depths"])))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
    ax.set_yticks(range(len(result["depths"])), [f"{d}%" for d in result["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="retrieval accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _parse_ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} takes comma-separated integers, got {text!r}") from None


def add_parser(sub) -> None:
    from dsv2.infer.cli import _model_args

    p = sub.add_parser("niah", help="needle-in-a-haystack retrieval grid (JSON + heat map)", description=__doc__,
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    _model_args(p)
    p.add_argument("--lengths", default=None,
                   help="context lengths, comma-separated (default: 8 lengths up to the model's length)")
    p.add_argument("--depths", default=",".join(map(str, DEFAULT_DEPTHS)), help="needle depths in percent")
    p.add_argument("--trials", type=int, default=4, help="prompts per (length, depth) cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default=None, help="filler corpus (default: the embedded stdlib sources)")
    p.add_argument("--out", default=None, help="directory for niah.json and niah.png (default: --model)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_command)


def _command(args) -> int:
    from dsv2.infer.cli import load_engine

    depths = _parse_ints(args.depths, "depths")
    out = Path(args.out or args.model)
    engine, tok, _ = load_engine(args)
    if args.lengths:
        lengths = _parse_ints(args.lengths, "lengths")
    else:
        top = engine.max_model_len
        lengths = sorted({max(64, round(top * k / 8)) for k in range(1, 9)})
    if max(lengths) > engine.max_model_len - 8:
        raise ValueError(f"--lengths up to {max(lengths)} leave no room to answer within the model's "
                         f"{engine.max_model_len} positions (raise --max-model-len)")
    engine.prefill_chunk = max(engine.prefill_chunk, max(lengths))
    res = run_niah(tok, engine_generate(engine, 8, not args.no_progress), lengths, depths, args.trials, args.seed,
                   args.corpus)
    quiet = engine_generate(engine, 8, False)
    res["copy_accuracy"] = copy_check(tok, quiet, seed=args.seed)
    res["copy_in_text_accuracy"] = copy_check(tok, quiet, seed=args.seed, filler=filler_tokens(tok, 4096, args.corpus))
    res["model"] = str(args.model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "niah.json").write_text(json.dumps(res, indent=1) + "\n")
    plot_niah(res, out / "niah.png", f"NIAH: {Path(args.model).name}")
    print("length  " + "  ".join(f"{n:>6}" for n in res["lengths"]))
    print("accuracy" + "  ".join(f"{res['mean'][str(n)]:>6.2f}" for n in res["lengths"]))
    print("digits  " + "  ".join(f"{res['digit_mean'][str(n)]:>6.2f}" for n in res["lengths"])
          + "   (share of the value's digits right in place; chance 0.10)")
    print(f"copy check: {res['copy_accuracy']:.2f} of random letter/digit strings continued from their earlier "
          "copy" + ("" if res["copy_accuracy"] >= 0.5 else " (retrieval needs this; this model barely copies from "
                    "its context, see docs/long_context.md)"))
    print(f"copy check inside text: {res['copy_in_text_accuracy']:.2f} of the same strings, with corpus text before "
          "and between them")
    print(f"wrote {out / 'niah.json'} and {out / 'niah.png'}")
    return 0
