"""The shared load test, unchanged, except that its images come from seeds shifted by ``--image-offset``.

Both servers cache prompt prefixes (images included) by default, so a second load of the same images on one server
would measure the cache. Shifting the seeds gives every load its own images while the client code, the prompts and
the JSON line stay exactly those of ``../shared/tools/loadtest.py``.

    python benchmarks/shifted_loadtest.py --loadtest ../shared/tools/loadtest.py --image-offset 1000 -- \\
        --base http://127.0.0.1:8000/v1 --model m --concurrency 16 --requests 64 --max-tokens 64 --ignore-eos
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def load(path: Path, image_offset: int, sizes: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """The load test's module namespace (its `asyncio.run(main())` left out), with `image_url` shifted (and, with
    `sizes`, image i of size sizes[i % len(sizes)]: mixed sizes for the families whose token counts follow them)."""
    source = path.read_text()
    head, found, _ = source.rpartition("asyncio.run(main())")
    if not found:
        raise SystemExit(f"{path}: no `asyncio.run(main())` entry point")
    namespace: dict[str, Any] = {"__name__": "loadtest", "__file__": str(path)}
    exec(compile(head, str(path), "exec"), namespace)  # the shared tool, read from disk
    original: Callable[..., str] = namespace["image_url"]
    if sizes:
        namespace["image_url"] = lambda seed, *a, **k: original(seed + image_offset, sizes[seed % len(sizes)])
    else:
        namespace["image_url"] = lambda seed, *a, **k: original(seed + image_offset, *a, **k)
    return namespace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loadtest", type=Path, required=True)
    p.add_argument("--image-offset", type=int, default=0)
    p.add_argument("--sizes", default="", help="image sizes WxH,WxH,... taken in turn (default: the tool's own)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the load test's own arguments, after --")
    args = p.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    sizes = [(int(w), int(h)) for w, h in (x.split("x") for x in args.sizes.split(",") if x)]
    namespace = load(args.loadtest, args.image_offset, sizes or None)
    sys.argv = [str(args.loadtest), *rest]
    asyncio.run(namespace["main"]())


if __name__ == "__main__":
    main()
