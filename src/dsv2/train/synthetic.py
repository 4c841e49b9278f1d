"""A built-in task suite with verifiable answers: multi-step arithmetic word problems (no data is downloaded).

    dsv2 tasks arithmetic --out runs/tasks                   # sft.jsonl, prompts_train/test.jsonl, pairs.jsonl
    dsv2 tasks arithmetic --out runs/tasks --steps 3 --max-number 50 --n-train 4000 --n-test 200 --seed 1

A problem is a short story: someone starts with a number of things, then `steps` events add, remove or (from
steps >= 3 on, with `multiply=True` by default there) multiply them; the question asks how many there are at the
end. Every intermediate count stays in [0, 999]. The worked solution writes one equation per event and ends with
`#### <answer>` (the GSM8K convention the math reward reads):

    prompt:   "Ada has 7 pens. She buys 5 more pens. Then she gives away 3 pens. How many pens does Ada have now?"
    solution: "Ada starts with 7 pens.\n7 + 5 = 12\n12 - 3 = 9\n#### 9"

`terse_fraction` (default 0) makes that share of the SFT solutions skip the working, as many human-written
answers do: "Ada starts with 7 pens.\n#### 9". A small model imitates both styles, and only the worked one is
within its reach on multi-step problems: the set-up where reinforcement learning from the answer reward (GRPO)
has something to find that imitation does not (docs/grpo.md).

Splits: a problem belongs to "test" when a hash of its prompt text falls in the lowest tenth, else to "train",
so the two splits never share a prompt, for any seed. Output is a pure function of (n, seed, split, knobs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ivy", "Jon", "Kai", "Lena", "Max", "Nora",
         "Omar", "Pia", "Raj", "Sara", "Tom", "Uma")
THINGS = ("apples", "pens", "books", "coins", "marbles", "stickers", "shells", "cards", "cookies", "stamps")
_PRONOUN = {n: ("She" if n in {"Ada", "Cleo", "Eva", "Gia", "Ivy", "Lena", "Nora", "Pia", "Sara", "Uma"} else "He")
            for n in NAMES}
_ADD = ("buys {k} more {t}", "finds {k} more {t}", "gets {k} more {t} as a gift", "wins {k} more {t}")
_SUB = ("gives away {k} {t}", "loses {k} {t}", "sells {k} {t}", "gives {k} {t} to a friend")
_MUL = ("collects until {p} has {k} times as many {t}",)
_THEN = ("Then", "After that", "Next", "Later")
TEST_FRACTION = 0.1
_LIMIT = 999  # intermediate counts stay in [0, _LIMIT]


def _is_test(prompt: str) -> bool:
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < TEST_FRACTION


def _one(rng: random.Random, steps: int, max_number: int, multiply: bool) -> dict:
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    pron = _PRONOUN[name]
    value = rng.randint(1, max_number)
    sentences = [f"{name} has {value} {things}."]
    lines = [f"{name} starts with {value} {things}."]
    for i in range(steps):
        ops = ["+"] * (value < _LIMIT) + ["-"] * (value > 0) + ["*"] * (multiply and 0 < value <= _LIMIT // 2)
        op = rng.choice(ops)
        if op == "+":
            k = rng.randint(1, min(max_number, _LIMIT - value))
            new, text = value + k, rng.choice(_ADD)
        elif op == "-":
            k = rng.randint(1, min(max_number, value))
            new, text = value - k, rng.choice(_SUB)
        else:
            k = rng.randint(2, max(2, min(5, _LIMIT // value)))
            new, text = value * k, rng.choice(_MUL)
        event = text.format(k=k, t=things, p=pron.lower())
        lead = pron if i == 0 else f"{rng.choice(_THEN)} {pron.lower()}"
        sentences.append(f"{lead} {event}.")
        lines.append(f"{value} {op} {k} = {new}")
        value = new
    sentences.append(f"How many {things} does {name} have now?")
    answer = str(value)
    lines.append(f"#### {answer}")
    return {"prompt": " ".join(sentences), "answer": answer, "solution": "\n".join(lines), "_lines": lines}


def _check_knobs(steps: int, max_number: int, split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if not 1 <= steps <= 20:
        raise ValueError(f"steps must be in 1..20, not {steps}")
    if not 2 <= max_number <= _LIMIT:
        raise ValueError(f"max_number must be in 2..{_LIMIT}, not {max_number}")


def _generate(n: int, seed: int, split: str, steps: int, max_number: int, multiply: bool | None) -> list[dict]:
    _check_knobs(steps, max_number, split)
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    multiply = steps >= 3 if multiply is None else multiply
    rng = random.Random(f"arithmetic:{seed}:{steps}:{max_number}:{multiply}")
    want_test, seen, out = split == "test", set(), []
    misses = 0
    while len(out) < n:
        if misses > 5000:  # the space of distinct problems is (nearly) used up
            raise ValueError(f"could only make {len(out)} distinct {split} problems of {n} with steps={steps}, "
                             f"max_number={max_number}: ask for fewer or raise max_number/steps")
        p = _one(rng, steps, max_number, multiply)
        if p["prompt"] in seen or _is_test(p["prompt"]) != want_test:
            misses += 1
            continue
        misses = 0
        seen.add(p["prompt"])
        out.append(p)
    return out


def arithmetic_tasks(n: int, seed: int, split: str = "train", *, steps: int = 2, max_number: int = 20,
                     multiply: bool | None = None) -> list[dict]:
    """`n` distinct arithmetic word problems: [{"prompt", "answer", "solution"}], deterministic per arguments.

    `steps` is the number of events after the start (the difficulty knob), each number drawn from 1..max_number;
    `multiply` allows "k times as many" events (default: only when steps >= 3). The "train" and "test" splits are
    disjoint (by a hash of the prompt) for any seeds."""
    return [{k: v for k, v in p.items() if k != "_lines"}
            for p in _generate(n, seed, split, steps, max_number, multiply)]


def _wrong_solution(p: dict, rng: random.Random) -> str:
    """A worked solution that is wrong: an arithmetic slip carried to the end, a missing final line, or a bare
    wrong number."""
    lines, answer = p["_lines"], int(p["answer"])
    kind = rng.randrange(3)
    if kind == 0 and len(lines) > 2:  # slip in one equation, carried through the rest
        body = lines[1:-1]
        i = rng.randrange(len(body))
        out, value, delta = [lines[0]], None, rng.choice([-2, -1, 1, 2, 10])
        for j, line in enumerate(body):
            lhs, rhs = line.split(" = ")
            a, op, k = lhs.split(" ")
            a = int(a) if value is None else value
            r = {"+": a + int(k), "-": a - int(k), "*": a * int(k)}[op]
            if j == i:
                r += delta
            out.append(f"{a} {op} {k} = {r}")
            value = r
        if value != answer:
            return "\n".join([*out, f"#### {value}"])
    if kind == 1:  # the right work without the final "#### n" line (badly formatted)
        return "\n".join(lines[:-1])
    wrong = answer + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    return f"#### {wrong}"


def preference_pairs(n: int, seed: int, split: str = "train", *, steps: int = 2, max_number: int = 20,
                     multiply: bool | None = None) -> list[dict]:
    """`n` reward-model pairs [{"prompt", "chosen", "rejected"}] on the problems of `arithmetic_tasks` (same
    arguments, same prompts): chosen is the worked solution, rejected a wrong one (an arithmetic slip carried to
    the end, the final `#### n` line missing, or a bare wrong answer)."""
    rng = random.Random(f"pairs:{seed}")
    return [{"prompt": p["prompt"], "chosen": p["solution"], "rejected": _wrong_solution(p, rng)}
            for p in _generate(n, seed, split, steps, max_number, multiply)]


def terse_solution(solution: str) -> str:
    """The solution without its working: the first line (who starts with what) and the answer line."""
    lines = solution.split("\n")
    return "\n".join([lines[0], lines[-1]])


def sft_rows(tasks: list[dict], terse_fraction: float = 0.0, seed: int = 0) -> list[dict]:
    """SFT chat rows: {"messages": [user prompt, assistant worked solution]}; a `terse_fraction` share of them
    (chosen by `seed`) answer without the working (`terse_solution`)."""
    if not 0.0 <= terse_fraction <= 1.0:
        raise ValueError(f"terse_fraction must be in [0, 1], not {terse_fraction}")
    rng = random.Random(f"terse:{seed}")
    return [{"messages": [{"role": "user", "content": t["prompt"]},
                          {"role": "assistant", "content": terse_solution(t["solution"])
                           if rng.random() < terse_fraction else t["solution"]}]}
            for t in tasks]


def write_arithmetic(out: str | Path, n_train: int = 2000, n_test: int = 200, n_pairs: int | None = None,
                     seed: int = 0, steps: int = 2, max_number: int = 20, multiply: bool | None = None,
                     terse_fraction: float = 0.0) -> dict:
    """Write sft.jsonl, prompts_train.jsonl, prompts_test.jsonl and pairs.jsonl into `out`; returns the counts."""
    knobs = {"steps": steps, "max_number": max_number, "multiply": multiply}
    train = arithmetic_tasks(n_train, seed, "train", **knobs)
    test = arithmetic_tasks(n_test, seed, "test", **knobs)
    pairs = preference_pairs(n_train if n_pairs is None else n_pairs, seed, "train", **knobs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"sft.jsonl": sft_rows(train, terse_fraction, seed),
             "prompts_train.jsonl": [{"prompt": t["prompt"], "answer": t["answer"]} for t in train],
             "prompts_test.jsonl": [{"prompt": t["prompt"], "answer": t["answer"]} for t in test],
             "pairs.jsonl": pairs}
    for name, rows in files.items():
        tmp = out / (name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out / name)
    return {name: len(rows) for name, rows in files.items()}


# ---- CLI -------------------------------------------------------------------------------------------------------
def add_command(subparsers) -> None:
    """Register `dsv2 tasks arithmetic`."""
    p = subparsers.add_parser("tasks", help="write a built-in synthetic task suite (SFT data, prompts, RM pairs)",
                              description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="tasks_command", required=True)
    a = verbs.add_parser("arithmetic", help="multi-step arithmetic word problems with worked solutions",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--n-train", type=int, default=2000, help="training problems (sft.jsonl, prompts_train.jsonl)")
    a.add_argument("--n-test", type=int, default=200, help="held-out problems (prompts_test.jsonl)")
    a.add_argument("--n-pairs", type=int, default=None, help="preference pairs (default: --n-train)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--steps", type=int, default=2, help="events per problem: the difficulty (default 2)")
    a.add_argument("--max-number", type=int, default=20, help="largest number drawn (default 20)")
    a.add_argument("--multiply", action=argparse.BooleanOptionalAction, default=None,
                   help="allow 'k times as many' events (default: only with --steps >= 3)")
    a.add_argument("--terse-fraction", type=float, default=0.0,
                   help="share of SFT solutions that skip the working (\"Ada starts with 7 pens.\\n#### 9\"); "
                        "default 0")
    a.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    counts = write_arithmetic(args.out, args.n_train, args.n_test, args.n_pairs, args.seed, args.steps,
                              args.max_number, args.multiply, args.terse_fraction)
    print(f"tasks: wrote {', '.join(f'{name} ({k} rows)' for name, k in counts.items())} to {args.out}")
    return 0
