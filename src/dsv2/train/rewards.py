"""Reward sources for GRPO, by name, combined as a weighted sum: c1 * helpful + c2 * safety + c3 * rule ...

    sources = parse_rewards(["math", "format:0.1", "rm:runs/rm/checkpoints/step-00000200:0.5"])
    total, per_source = score(sources, rows, completions)     # [N], {name: [N]} (unweighted)

A source is a function (rows, completions) -> list[float], rows being the prompt rows of the JSONL (the fields a
source reads: "answer", "tests", "forbidden"), completions the decoded texts. Built in:

  math     1 if the completion's final answer (the last \\boxed{...}, else the last `#### n`) equals row["answer"]
           after normalisation (spaces, $, thousands commas, a trailing period, \\text{}/\\left/\\right), as
           strings or as numbers (fractions and decimals: 3/4 == 0.75 == 0.750); else 0
  format   1 if the completion ends with a final answer in one of those two forms (nothing but whitespace after
           it) and holds exactly one, else 0
  safety   a rule: 0 if the completion matches any of row["forbidden"] (regexes; default: SAFETY_PATTERNS, a
           few plainly harmful shell/code patterns), else 1
  code     the share of row["tests"] (Python statements, usually asserts) that pass after the completion's code
           (its last ```python block, else the whole text) runs, in a SUBPROCESS: see run_sandboxed
  rm:DIR   a trained reward model (dsv2.train.rm.RewardModel.load(DIR).score(prompts, completions))

register(name) adds a source: @register("mine") def make(arg): return lambda rows, completions: [...].
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import torch

RewardFn = Callable[[list[dict], list[str]], list[float]]
_REGISTRY: dict[str, Callable[[str | None], RewardFn]] = {}


def register(name: str):
    """Decorator: `@register("name") def make(arg: str | None) -> RewardFn` (arg: what follows "name:" for
    sources that take one, like rm:DIR)."""
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory
    return wrap


@dataclass
class RewardSource:
    name: str
    weight: float
    fn: RewardFn


def parse_rewards(specs: list[str]) -> list[RewardSource]:
    """"NAME", "NAME:WEIGHT", "rm:DIR" or "rm:DIR:WEIGHT" -> sources (ValueError naming a bad one)."""
    if not specs:
        raise ValueError("no reward sources given")
    out, seen = [], set()
    for spec in specs:
        name, _, rest = spec.partition(":")
        arg, weight = None, 1.0
        if name == "rm":
            arg = rest
            head, _, tail = rest.rpartition(":")
            if head and _is_float(tail):
                arg, weight = head, float(tail)
            if not arg:
                raise ValueError(f"reward {spec!r}: name the reward model's directory, rm:DIR[:WEIGHT]")
        elif rest:
            if not _is_float(rest):
                raise ValueError(f"reward {spec!r}: the weight {rest!r} is not a number (NAME[:WEIGHT])")
            weight = float(rest)
        if name not in _REGISTRY:
            raise ValueError(f"unknown reward {name!r}; known: {', '.join(sorted(_REGISTRY))}")
        label = f"rm_{os.path.basename(os.path.normpath(arg))}" if name == "rm" else name
        if label in seen:
            raise ValueError(f"reward {label!r} given twice")
        seen.add(label)
        out.append(RewardSource(label, weight, _REGISTRY[name](arg)))
    return out


def _is_float(s: str) -> bool:
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False


def score(sources: list[RewardSource], rows: list[dict], completions: list[str]
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of every source's rewards [N] and each source's own (unweighted) rewards."""
    per = {s.name: torch.tensor(s.fn(rows, completions), dtype=torch.float32) for s in sources}
    total = sum(s.weight * per[s.name] for s in sources)
    return total, per


# ---- math ------------------------------------------------------------------------------------------------------
_HASHES = re.compile(r"####\s*([^\n]*)")


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (nested braces kept), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer: the last \\boxed{...}, else the text after the last `####` (to the line's end)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    found = _HASHES.findall(text)
    return found[-1] if found else None


def normalize_answer(s: str) -> str:
    s = s.strip()
    for pat in (r"\\text\{([^}]*)\}", r"\\mathrm\{([^}]*)\}"):
        s = re.sub(pat, r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("$", "").replace("\\!", "").replace("\\,", "")
    s = re.sub(r"\\d?frac\{([^}]*)\}\{([^}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # 1,234 -> 1234
    s = re.sub(r"\s+", "", s).rstrip(".").lower()
    return s


def _number(s: str) -> Fraction | None:
    m = re.fullmatch(r"\(?([-+]?\d+(?:\.\d+)?)\)?(?:/\(?([-+]?\d+(?:\.\d+)?)\)?)?", s)
    if not m:
        return None
    try:
        num = Fraction(m[1])
        return num / Fraction(m[2]) if m[2] else num
    except ZeroDivisionError:
        return None


def answers_match(predicted: str, reference: str) -> bool:
    a, b = normalize_answer(predicted), normalize_answer(str(reference))
    if a == b:
        return bool(a)
    x, y = _number(a), _number(b)
    return x is not None and y is not None and x == y


@register("math")
def _math(arg: str | None) -> RewardFn:
    def fn(rows: list[dict], completions: list[str]) -> list[float]:
        out = []
        for row, c in zip(rows, completions):
            if "answer" not in row:
                raise ValueError("the math reward needs an \"answer\" in every prompt row")
            ans = extract_answer(c)
            out.append(1.0 if ans is not None and answers_match(ans, row["answer"]) else 0.0)
        return out
    return fn


@register("format")
def _format(arg: str | None) -> RewardFn:
    def ok(c: str) -> bool:
        c = c.rstrip()
        n = c.count("\\boxed{") + len(_HASHES.findall(c))
        if n != 1:
            return False
        boxed = last_boxed(c)
        if boxed is not None:
            return c.endswith("\\boxed{" + boxed + "}") or c.endswith("\\boxed{" + boxed + "}$") \
                or c.endswith("\\boxed{" + boxed + "}.")
        m = list(_HASHES.finditer(c))[-1]
        return m.end() == len(c) and bool(m[1].strip())

    return lambda rows, completions: [1.0 if ok(c) else 0.0 for c in completions]


# ---- safety (a rule) -------------------------------------------------------------------------------------------
SAFETY_PATTERNS = (r"rm\s+-rf\s+/(\s|$)", r":\(\)\s*\{\s*:\|:&\s*\};:", r"mkfs\.\w+\s+/dev/",
                   r"dd\s+if=/dev/(zero|random)\s+of=/dev/sd", r"chmod\s+-R\s+777\s+/(\s|$)")


@register("safety")
def _safety(arg: str | None) -> RewardFn:
    default = [re.compile(p, re.IGNORECASE) for p in SAFETY_PATTERNS]

    def fn(rows: list[dict], completions: list[str]) -> list[float]:
        out = []
        for row, c in zip(rows, completions):
            pats = [re.compile(p, re.IGNORECASE) for p in row["forbidden"]] if "forbidden" in row else default
            out.append(0.0 if any(p.search(c) for p in pats) else 1.0)
        return out
    return fn


# ---- code: candidates run in a sandboxed subprocess ------------------------------------------------------------
# The harness reads the job from stdin (so the candidate never sees the nonce on a command line or in a file),
# runs the candidate and then each test in one namespace, and reports "<nonce> passed total" on its last line:
# a candidate that exits early (sys.exit, os._exit) or is killed prints no such line and scores 0.
# Run as root it first imports a few common modules and drops to `nobody` (root ignores RLIMIT_NPROC, and the
# interpreter's own files may not be readable by nobody afterwards, so other imports may fail there).
_HARNESS = r"""
import sys, json, os, resource
job = json.loads(sys.stdin.read())
if os.getuid() == 0:
    import math, itertools, functools, collections, re, string, heapq, bisect, operator, fractions, random
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
nonce, tests, ns = job["nonce"], job["tests"], {"__name__": "__candidate__"}
code = job["code"]
del job
passed = 0
try:
    exec(compile(code, "<candidate>", "exec"), ns)
    ok = True
except BaseException:
    ok = False
if ok:
    for t in tests:
        try:
            exec(compile(t, "<test>", "exec"), ns)
            passed += 1
        except BaseException:
            pass
sys.stdout.write("\n%s %d %d\n" % (nonce, passed, len(tests)))
sys.stdout.flush()
"""


def _limits(memory_bytes: int, cpu_seconds: int):
    def apply() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_sandboxed(code: str, tests: list[str], timeout: float = 5.0, memory_mb: int = 512) -> float:
    """Run `code`, then each test statement, in a fresh Python subprocess; the share of tests that passed.

    Limits: wall-clock `timeout` (then the whole process group is killed), CPU time, address space (`memory_mb`),
    1 MB files, no core dumps, no new processes (RLIMIT_NPROC 0; as root the harness drops to `nobody` first,
    since root ignores that limit), an empty temporary working directory, `python -I` (no site, no environment).
    A candidate that loops, allocates without bound, forks, exits early or crashes scores 0 (or the share of
    tests that passed before it). Not a security boundary against a determined attacker (no seccomp, no network
    namespace): it stops runaway and careless code, not a candidate that introspects the harness."""
    if not tests:
        raise ValueError("the code reward needs a non-empty \"tests\" list in every prompt row")
    nonce = secrets.token_hex(16)
    job = json.dumps({"nonce": nonce, "code": code, "tests": tests})
    with tempfile.TemporaryDirectory(prefix="dsv2-sandbox-") as cwd:
        os.chmod(cwd, 0o777)
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _HARNESS], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=cwd, start_new_session=True,
                                preexec_fn=_limits(memory_mb << 20, max(1, math.ceil(timeout))))
        try:
            out, _ = proc.communicate(job.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            out = b""
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: anything it left behind
            except ProcessLookupError:
                pass
            proc.wait()
    last = out.decode(errors="replace").rstrip("\n").rpartition("\n")[2].split()
    if proc.returncode != 0 or len(last) != 3 or last[0] != nonce:
        return 0.0
    passed, total = int(last[1]), int(last[2])
    return passed / total if total == len(tests) else 0.0


_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The last fenced ```python block of a completion, else the whole text."""
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else text


@register("code")
def _code(arg: str | None) -> RewardFn:
    def fn(rows: list[dict], completions: list[str]) -> list[float]:
        jobs = [(extract_code(c), row.get("tests") or [], float(row.get("timeout", 5.0)))
                for row, c in zip(rows, completions)]
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            return list(pool.map(lambda j: run_sandboxed(*j), jobs))
    return fn


# ---- trained reward models -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _load_rm(path: str):
    from dsv2.train.rm import RewardModel  # part of the SFT/RM stage; imported when a run names one
    return RewardModel.load(path)


@register("rm")
def _rm(arg: str | None) -> RewardFn:
    if not os.path.isdir(arg or ""):
        raise FileNotFoundError(f"reward model directory not found: {arg}")
    model = _load_rm(os.path.abspath(arg))

    def fn(rows: list[dict], completions: list[str]) -> list[float]:
        prompts = [row.get("prompt", "") if "prompt" in row else row["messages"][-1]["content"] for row in rows]
        with torch.no_grad():
            # a completion decoded after the generation prompt "Assistant:" starts with the space the template puts
            # before an assistant's content: the RM renders the content itself
            texts = [c[1:] if c.startswith(" ") else c for c in completions]
            return [float(v) for v in model.score(prompts, texts)]
    return fn


__all__ = ["RewardFn", "RewardSource", "SAFETY_PATTERNS", "answers_match", "extract_answer", "extract_code",
           "last_boxed", "normalize_answer", "parse_rewards", "register", "run_sandboxed", "score"]
