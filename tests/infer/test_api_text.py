"""Incremental stop-string matching in TextStream: the same cut as a plain search over the whole text (the
reference: the earliest-ending occurrence, computed with str.find), and linear cost in the stop strings' length."""

from __future__ import annotations

import random
import time

from dsv2.infer.text import TextStream


def _chars(ids):  # a "tokenizer" where token i is the character chr(i)
    return "".join(map(chr, ids))


def _reference(text: str, stops: list[str]) -> str:
    """Where a client reading the whole text would first see a stop string end, cut at that string's start."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    return text if best is None else text[:best[1]]


def test_stop_matching_equals_a_search_over_the_whole_text():
    rng = random.Random(0)
    for trial in range(400):
        alphabet = "ab" if trial % 2 else "abc"
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        stream = TextStream(_chars, stops)
        out, ids = "", [ord(c) for c in text]
        while ids:  # tokens of 1..3 characters
            k = rng.randint(1, 3)
            piece = stream.push(ids[:k])
            ids = ids[k:]
            out += piece
            expected = _reference(text, stops)
            assert expected.startswith(out), (text, stops, out)  # nothing past a stop string is ever sent
            if stream.stopped:
                break
        out += stream.finish()
        assert out == _reference(text, stops), (text, stops)
        assert stream.stopped == (out != text or any(s in text for s in stops))


def test_long_stop_strings_cost_linear_time():
    """Four 100k-character stop strings that keep almost matching: every step used to rescan them (quadratic)."""
    stops = ["a" * 99_999 + c for c in "bcde"]
    stream = TextStream(_chars, stops)
    start = time.perf_counter()
    out = "".join(stream.push([ord("a")] * 50) for _ in range(4000))  # 200k characters, 4000 steps
    elapsed = time.perf_counter() - start
    assert out == "a" * (200_000 - 99_999)  # the last 99,999 characters may still start a stop string: held
    assert stream.finish() == "a" * 99_999
    assert elapsed < 5.0, elapsed  # about 1.5 s here; the quadratic scan did not finish in minutes
