"""Structured outputs under load: 16 concurrent json_schema requests whose output runs to max_tokens, against the
same load unconstrained, on one server, rounds alternating; prints one JSON line (also results/structured.json).

    python benchmarks/bench_structured.py              # the vLLM benchmark's checkpoint, float32, 3 rounds
    python benchmarks/bench_structured.py --rounds 1 --requests 16

The schema is an object holding one string of at least 4 000 characters, so no answer can end before max_tokens
(an array with a large minItems is no good: llguidance unrolls the bounded repetition, 30 ms a token): both loads
generate exactly requests x max_tokens tokens, and the ratio is the cost of the grammar (the mask of every
constrained row at every step, the matchers following the tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_serving import data_url, free_port, loadtest_png, running_server  # noqa: E402
from checkpoint import PEER, ensure  # noqa: E402

log = logging.getLogger("bench_structured")
SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "minLength": 4000}}, "required": ["text"],
          "additionalProperties": False}


async def load(url: str, model: str, args: argparse.Namespace, constrained: bool, offset: int) -> dict[str, Any]:
    sem = asyncio.Semaphore(args.concurrency)
    extra: dict[str, Any] = {"ignore_eos": True}
    if constrained:
        extra["response_format"] = {"type": "json_schema", "json_schema": {"name": "words", "schema": SCHEMA}}

    async def one(client: httpx.AsyncClient, i: int) -> dict[str, Any]:
        body = {"model": model, "max_tokens": args.max_tokens, "temperature": 1, "seed": i, **extra,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url(loadtest_png(offset + i))}},
                    {"type": "text", "text": "list the words you see"}]}]}
        async with sem:
            r = await client.post(url + "/v1/chat/completions", json=body)
        r.raise_for_status()
        out = r.json()
        return {"tokens": out["usage"]["completion_tokens"], "finish": out["choices"][0]["finish_reason"],
                "text": out["choices"][0]["message"]["content"]}

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, i) for i in range(args.requests)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    if constrained:  # every answer is a prefix of a valid document: '{"text":"...'
        assert all(r["text"].startswith('{"text":"') for r in results), results[0]["text"][:80]
    return {"wall_s": round(wall, 3), "tokens": tokens, "tok_per_s": round(tokens / wall, 2),
            "finish": sorted({r["finish"] for r in results})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--ckpt-dir", type=Path, default=Path("/tmp/vlmserve-bench"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "structured.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ckpt = ensure(PEER, args.ckpt_dir)
    log_dir = args.ckpt_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "vlmserve.server.cli", "serve", "--model", str(ckpt), "--device", "cpu",
           "--dtype", args.dtype, "--port", str(port), "--log-level", "warning"]
    rounds = []
    with running_server("ours", cmd, port, "/ready", log_dir, None, 600) as server:
        asyncio.run(load(server.url, ckpt.name, argparse.Namespace(**{**vars(args), "requests": 16}), True, 10**6))
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            got = {c: asyncio.run(load(server.url, ckpt.name, args, c, 1000 * (r + 1) + 500 * c)) for c in order}
            rounds.append({"free": got[False], "json_schema": got[True],
                           "ratio": round(got[True]["tok_per_s"] / got[False]["tok_per_s"], 3)})
            log.info("round %d: %s", r, rounds[-1])
    out = {"benchmark": "structured", "checkpoint": str(ckpt), "args": {k: str(v) for k, v in vars(args).items()},
           "schema": SCHEMA, "rounds": rounds, "ratio_median": statistics.median(x["ratio"] for x in rounds),
           "goal": ">= 0.8"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
