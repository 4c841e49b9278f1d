"""Load benchmark for `dsv2 serve`: concurrent streaming clients, some of which disconnect mid-stream.

    dsv2 serve --model runs/small --port 8000 &
    python benchmarks/server_load.py --url http://127.0.0.1:8000 --clients 32 --requests 128 --disconnect 0.25

Prints completed/failed/disconnected counts, p50/p95 latency and time to first token, generated tokens/s, and
checks afterwards that the server is idle with every cache block free; writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import httpx


async def one(http, args, i, rng, out):
    disconnect_after = rng.randint(1, 8) if rng.random() < args.disconnect else None
    body = {"model": args.model, "prompt": f"def function_{i}(x):", "max_tokens": args.max_tokens,
            "temperature": 0.8, "seed": i, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    start, first, events, tokens = time.perf_counter(), None, 0, 0
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out["failed"] += 1
                out["statuses"][str(r.status_code)] = out["statuses"].get(str(r.status_code), 0) + 1
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["failed"] += 1
                    return
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None:
                    first = time.perf_counter()
                events += 1
                if disconnect_after is not None and events >= disconnect_after:
                    out["disconnected"] += 1
                    return  # leaving the block closes the connection mid-stream
    except httpx.HTTPError:
        out["failed"] += 1
        return
    out["completed"] += 1
    out["latency"].append(time.perf_counter() - start)
    out["ttft"].append((first or time.perf_counter()) - start)
    out["tokens"] += tokens


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def main(args) -> dict:
    out = {"completed": 0, "failed": 0, "disconnected": 0, "latency": [], "ttft": [], "tokens": 0, "statuses": {}}
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.clients)
    async with httpx.AsyncClient(base_url=args.url, timeout=600, limits=limits) as http:
        if args.model is None:
            args.model = (await http.get("/v1/models")).json()["data"][0]["id"]
        sem = asyncio.Semaphore(args.clients)

        async def bounded(i):
            async with sem:
                await one(http, args, i, rng, out)

        start = time.perf_counter()
        await asyncio.gather(*(bounded(i) for i in range(args.requests)))
        wall = time.perf_counter() - start
        await asyncio.sleep(1.0)
        health = (await http.get("/health")).json()
    result = {"clients": args.clients, "requests": args.requests, "disconnect_fraction": args.disconnect,
              "max_tokens": args.max_tokens, "completed": out["completed"], "failed": out["failed"],
              "disconnected": out["disconnected"], "statuses": out["statuses"], "wall_s": round(wall, 2),
              "latency_p50_s": round(pct(out["latency"], 0.5), 3), "latency_p95_s": round(pct(out["latency"], 0.95), 3),
              "ttft_p50_s": round(pct(out["ttft"], 0.5), 3), "ttft_p95_s": round(pct(out["ttft"], 0.95), 3),
              "completed_tokens_per_s": round(out["tokens"] / wall, 1),
              "idle_after": health["running"] == 0 and health["free_blocks"] == health["total_blocks"]}
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model id (default: the server's first)")
    p.add_argument("--clients", type=int, default=32, help="concurrent streams")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--disconnect", type=float, default=0.25, help="fraction of clients that leave mid-stream")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/server_load.json")
    args = p.parse_args()
    res = asyncio.run(main(args))
    for k, v in res.items():
        print(f"{k:>24}: {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
