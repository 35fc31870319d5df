"""`vlmserve bench`: concurrent streaming load against a running server's chat API, one JSON line of results.

Each request carries its own image (a PNG drawn from the request's index, or the files given), streams its answer
and reports usage; the summary has requests/s, completion tokens/s, time to first token and inter-token latency
percentiles, and the statuses of failed requests. Only the given URL is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vlmserve_client import AsyncClient, VlmserveError


def synthetic_png(seed: int, side: int = 160) -> bytes:
    """A different small picture for every seed: a grey canvas with one coloured disc."""
    rng = random.Random(seed)
    image = Image.new("RGB", (side, side), (rng.randrange(225, 256),) * 3)
    x, y, r = rng.randrange(20, side - 60), rng.randrange(20, side - 60), rng.randrange(15, 40)
    ImageDraw.Draw(image).ellipse((x, y, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@dataclass
class _Results:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


async def _one(client: AsyncClient, args: argparse.Namespace, image: bytes, out: _Results) -> None:
    stream = client.chat_stream(args.prompt, images=[image], model=args.model or None, max_tokens=args.max_tokens,
                                temperature=0, extra_body={"ignore_eos": args.ignore_eos})
    t0 = time.perf_counter()
    last = None
    try:
        async with stream:
            async for _ in stream:
                now = time.perf_counter()
                if last is None:
                    out.ttft.append(now - t0)
                else:
                    out.itl.append(now - last)
                last = now
        usage = stream.completion.usage
        out.tokens.append(usage.completion_tokens if usage else 0)
    except VlmserveError as e:
        # An HTTP (or in-stream) error counts under its status; a connection failure under httpx's exception name.
        key = str(e.status) if e.status is not None else type(e.__cause__ or e).__name__
        out.errors[key] = out.errors.get(key, 0) + 1


def _pct(xs: list[float], q: float) -> float | None:
    return round(sorted(xs)[min(len(xs) - 1, int(q * len(xs)))], 4) if xs else None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    files = [Path(p).read_bytes() for p in args.image]
    images = files or [synthetic_png(i) for i in range(args.distinct_images)]
    out = _Results()
    gate = asyncio.Semaphore(args.concurrency)
    async with AsyncClient(args.url, timeout=args.timeout, max_retries=0,
                           max_connections=args.concurrency + 4) as client:

        async def guarded(i: int) -> None:
            async with gate:
                await _one(client, args, images[i % len(images)], out)

        t0 = time.perf_counter()
        await asyncio.gather(*(guarded(i) for i in range(args.requests)))
        wall = time.perf_counter() - t0
    return {
        "url": args.url, "requests": args.requests, "concurrency": args.concurrency, "wall_s": round(wall, 3),
        "ok": len(out.tokens), "errors": out.errors, "req_per_s": round(len(out.tokens) / wall, 3),
        "completion_tok_per_s": round(sum(out.tokens) / wall, 2),
        "mean_completion_tokens": round(statistics.mean(out.tokens), 1) if out.tokens else 0,
        "ttft_p50": _pct(out.ttft, 0.5), "ttft_p95": _pct(out.ttft, 0.95),
        "itl_p50": _pct(out.itl, 0.5), "itl_p95": _pct(out.itl, 0.95),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vlmserve bench", description="Concurrent streaming load against a server.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server root")
    p.add_argument("--model", default=None)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--distinct-images", type=int, default=64, help="synthetic images to cycle through")
    p.add_argument("--image", action="append", default=[], help="use these image files instead (repeatable)")
    p.add_argument("--prompt", default="Describe the image.")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens per request")
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.requests < 1 or args.distinct_images < 1:
        p.error("--concurrency, --requests and --distinct-images must be positive")
    result = asyncio.run(run(args))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0 if result["ok"] else 1
