"""The `dsv2` command line: `dsv2 <verb> --help` explains each verb.

Each verb lives with the code it drives and registers itself through an `add_*command(subparsers)` function
listed in _COMMANDS; the registered function receives the parsed arguments and returns an exit code. User
mistakes (ValueError, FileNotFoundError, dsv2.CheckpointError) print one `error:` line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

_COMMANDS = [
    "dsv2.info:add_command",
    "dsv2.tokenizer:add_tokenizer_command",
    "dsv2.train.pretrain:add_command",
    "dsv2.train.grpo:add_command",
    "dsv2.train.synthetic:add_command",
    "dsv2.train.sft:add_command",
    "dsv2.train.rm:add_command",
    "dsv2.infer.cli:add_commands",
    "dsv2.demo:add_command",
    "dsv2.init:add_command",
    "dsv2.train.extend:add_command",
    "dsv2.eval.cli:add_command",
    "dsv2.ablate:add_command",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv2", description="DeepSeek-V2 end to end: inspect, train, align and serve DeepSeek-V2 models.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for spec in _COMMANDS:
        module, func = spec.split(":")
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            PermissionError) as e:  # user mistakes: a path missing, in the way, or of the wrong kind
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`dsv2 info ... | head`): not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush stays quiet
        return 0


if __name__ == "__main__":
    sys.exit(main())
