"""Small helpers shared by every layer of the package (imports nothing from dsv2)."""

from __future__ import annotations

import re

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in a size such as 5GB (10^9), 512MiB (2^20) or 1000000; ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r} (examples: 5GB, 500MB, 1000000)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def int_in(lo: int, hi: int | None = None):
    """An argparse `type`: an int in [lo, hi] (hi None: no bound), else argparse's own usage error (exit 2)."""
    import argparse

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is not in {lo}..{'' if hi is None else hi}")
        return v

    return parse
