"""Paired A/B of two commits of vlmserve, served: the 16-stream load of bench_vllm.py against each, alternating.

This machine's speed drifts by more than most single changes move (the same code at 16 float32 streams: 317-408
tok/s within an hour), so a change is judged by pairs: per round, each commit's server in turn (the order
alternates), started fresh from its own worktree, warmed up, then the headline load (`--concurrency 16 --requests
64 --max-tokens 64 --ignore-eos`, images no earlier load of that server used). The ratio new/old of each round is the
figure to quote; the medians beside it.

    python benchmarks/ab_commits.py --old b0d7ab4 --new HEAD --dtype bfloat16 --rounds 3

Prints one JSON line (per-round figures included).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.bench_serving import free_port, running_server  # noqa: E402
from benchmarks.bench_vllm import shifted_load  # noqa: E402
from benchmarks.checkpoint import PEER, ensure  # noqa: E402

log = logging.getLogger("ab_commits")


def checkout(rev: str, root: Path) -> Path:
    """A detached worktree of `rev` under `root`, importable as `vlmserve` from `root / rev / 'path'`."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = root / sha / "tree"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(tree), sha], check=True,
                       capture_output=True)
    link = root / sha / "path" / "vlmserve"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(tree)
    return tree


def measure(tree: Path, args: argparse.Namespace, ckpt: Path, offset: int, log_dir: Path) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "vlmserve.server.cli", "serve", "--model", str(ckpt), "--device", "cpu", "--dtype",
           args.dtype, "--port", str(port), "--log-level", "warning"]
    env = {"PYTHONPATH": str(tree.parent / "path")}
    with running_server(tree.parent.name, cmd, port, "/ready", log_dir, None, 600, env) as server:
        shifted_load(args, server.url, ckpt.name, offset + 40_000, 16, 16, 8)  # warm-up
        return shifted_load(args, server.url, ckpt.name, offset, 16, args.requests, args.max_tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True)
    p.add_argument("--new", default="HEAD")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ckpt-dir", type=Path, default=Path(tempfile.gettempdir()) / "vlmserve-bench")
    p.add_argument("--loadtest", type=Path, default=ROOT.parent / "shared" / "tools" / "loadtest.py")
    args = p.parse_args()
    args.sizes = None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ckpt = ensure(PEER, args.ckpt_dir)
    root = args.ckpt_dir / "ab"
    log_dir = args.ckpt_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    trees = {"old": checkout(args.old, root), "new": checkout(args.new, root)}
    rounds = []
    for r in range(args.rounds):
        order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
        result = {which: measure(trees[which], args, ckpt, 300_000 + 10_000 * r + 5_000 * (which == "new"), log_dir)
                  for which in order}
        result["ratio_tok_per_s"] = round(result["new"]["tok_per_s"] / result["old"]["tok_per_s"], 3)
        result["ratio_ttft_p50"] = round(result["new"]["ttft_p50"] / result["old"]["ttft_p50"], 3)
        log.info("round %d: %s", r, {k: v for k, v in result.items() if k.startswith("ratio")})
        rounds.append(result)

    def med(key: str, which: str | None = None) -> float:
        return round(statistics.median(r[which][key] if which else r[key] for r in rounds), 3)

    print(json.dumps({"benchmark": "ab_commits", "old": trees["old"].parent.name, "new": trees["new"].parent.name,
                      "dtype": args.dtype, "ratio_tok_per_s": med("ratio_tok_per_s"),
                      "ratio_ttft_p50": med("ratio_ttft_p50"), "old_tok_per_s": med("tok_per_s", "old"),
                      "new_tok_per_s": med("tok_per_s", "new"), "rounds": rounds}))


if __name__ == "__main__":
    main()
