"""`dsv2 eval <niah | ppl | lm>`: evaluate a checkpoint (see each sub-verb's --help).

    dsv2 eval niah --model DIR                             # needle-in-a-haystack grid: niah.json + niah.png
    dsv2 eval ppl --model DIR --data corpus/               # loss by position bucket: ppl.json + ppl.png
    dsv2 eval lm --model DIR --tasks arc_easy --limit 100  # lm-evaluation-harness (pip install dsv2[eval])
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LM_EVAL_MISSING = "lm-eval is not installed; install the extra: pip install dsv2[eval]"


def add_command(subparsers) -> None:
    """Register `dsv2 eval` and its sub-verbs."""
    from dsv2.eval import niah, ppl

    p = subparsers.add_parser("eval", help="evaluate a checkpoint: niah (retrieval grid), ppl (loss by position), "
                                           "lm (lm-evaluation-harness tasks)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="eval_verb", metavar="{niah,ppl,lm}")
    niah.add_parser(sub)
    ppl.add_parser(sub)
    _add_lm_parser(sub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _add_lm_parser(sub) -> None:
    p = sub.add_parser("lm", help="lm-evaluation-harness tasks on the model (needs: pip install dsv2[eval])",
                       description="Run lm-evaluation-harness tasks with dsv2's model class (dsv2.eval.lm.DSV2LM: "
                                   "the model's forward for log-likelihoods, the Engine for generation).\n\n"
                                   "    dsv2 eval lm --model DIR --tasks arc_easy,hellaswag --limit 100\n"
                                   "    dsv2 eval lm --model DIR --include-path tests/fixtures/lm_tasks "
                                   "--tasks dsv2_tiny",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (with its tokenizer)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names")
    p.add_argument("--include-path", default=None, help="directory of extra task YAML files (local tasks)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward; requests decoded together")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write lm-eval's results (JSON) here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_lm_command)


def _lm_command(args) -> int:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError(LM_EVAL_MISSING) from None
    import torch

    from dsv2.eval.lm import evaluate

    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {args.model}")
    if args.include_path and not Path(args.include_path).is_dir():
        raise FileNotFoundError(f"--include-path directory not found: {args.include_path}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    res = evaluate(args.model, tasks, args.include_path, args.limit, args.num_fewshot, args.batch_size, device,
                   args.seed, not args.no_progress)
    from lm_eval.utils import make_table

    print(make_table(res))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({k: res[k] for k in ("results", "versions", "n-shot", "config")
                                                 if k in res}, indent=1, default=str) + "\n")
        print(f"wrote {args.output}")
    return 0
