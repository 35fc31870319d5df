"""`vlmserve train` and `vlmserve eval` (wired into the main CLI by server/cli.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# On a shared CPU, OpenMP's spinning threads collapse under contention (measured here: 9 vs 49 ex/s for a ViT step
# with 2 threads while other processes ran); passive waiting keeps the throughput. Read when torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


def _setup(threads: int, level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    torch.set_num_threads(threads)


def result_table(result: dict[str, Any], mistakes: int = 5) -> str:
    """An eval result for people: accuracy per kind and overall, the time taken, and the first few mistakes."""

    def row(name: str, r: dict[str, Any]) -> str:
        accuracy = "-" if math.isnan(r["accuracy"]) else f"{100 * r['accuracy']:.1f}%"
        return f"{name:<8} {r['correct']:>7} {r['n']:>6} {accuracy:>9}"

    lines = [f"{'kind':<8} {'correct':>7} {'n':>6} {'accuracy':>9}"]
    lines += [row(kind, r) for kind, r in result["per_kind"].items()]
    lines += [row("overall", result), ""]
    rate = result["n"] / result["seconds"] if result.get("seconds") else 0.0
    lines.append(f"{result['n']} questions in {result.get('seconds', 0):.1f} s ({rate:.1f} per second)")
    wrong = result.get("mistakes", [])[:mistakes]
    if wrong:
        lines.append("first mistakes:")
        lines += [f"  {m['kind']}: {m['question']} -> {m['got'].strip()!r} (expected {m['answer']!r})" for m in wrong]
    return "\n".join(lines)


def train_main(argv: Sequence[str] | None = None) -> int:
    """`train --stage all|vision|lm|align|instruct --out DIR --config NAME [--resume] [--export DIR]`; with a hearing
    recipe (`--config hearing [--base DIR]`), `--stage all|hear|hear-align|hear-instruct` teaches a finished model
    the SOUNDS world."""
    from .hearing import HEARING_STAGES
    from .hearing_recipe import HEARING_RECIPES
    from .recipe import RECIPES, get_recipe
    from .stages import STAGES, run_stages

    p = argparse.ArgumentParser(prog="vlmserve train", description="Train the SHAPES world model, LLaVA-style, and "
                                "teach it the SOUNDS world (--config hearing).")
    p.add_argument("--stage", default="all", choices=["all", *STAGES, *HEARING_STAGES])
    p.add_argument("--out", required=True, type=Path, help="run directory (checkpoints; the model lands in OUT/model)")
    p.add_argument("--config", default="shapes", help=f"recipe preset {sorted(RECIPES)} or a recipe JSON file")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT")
    p.add_argument("--export", type=Path, default=None, help="also copy the final model directory here")
    p.add_argument("--base", default=None, help="hearing recipes: the finished SHAPES model to start from")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    _setup(args.threads)
    if args.base is not None and args.config not in HEARING_RECIPES:
        p.error("--base goes with a hearing recipe (--config hearing)")
    hearing = args.config in HEARING_RECIPES
    if (args.stage in HEARING_STAGES) != hearing and args.stage != "all":
        p.error(f"--stage {args.stage} goes with {'a hearing' if args.stage in HEARING_STAGES else 'a SHAPES'} recipe")
    if hearing:
        from .hearing_instruct import run_hearing

        stages = list(HEARING_STAGES) if args.stage == "all" else [args.stage]
        recipe = HEARING_RECIPES[args.config]
        if args.base is not None:
            recipe = dataclasses.replace(recipe, base=args.base)
        summary = run_hearing(recipe, args.out, stages, resume=args.resume)
    else:
        stages = list(STAGES) if args.stage == "all" else [args.stage]
        summary = run_stages(get_recipe(args.config), args.out, stages, resume=args.resume)
    if args.export is not None and (args.out / "model").is_dir():
        shutil.copytree(args.out / "model", args.export, dirs_exist_ok=True)
    json.dump({k: v for k, v in summary.items()}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def eval_main(argv: Sequence[str] | None = None) -> int:
    """`eval [--world shapes|sounds] (--model DIR | --url BASE) [--n 500] [--seed S] [--json] [--json-schema]`:
    per-kind exact match on the world's independent renderer (SHAPES: eval_world.py, SOUNDS: eval_sounds.py)."""
    p = argparse.ArgumentParser(prog="vlmserve eval",
                                description="Per-kind accuracy on the independent SHAPES or SOUNDS question set.")
    p.add_argument("--world", default="shapes", choices=["shapes", "sounds"],
                   help="the world asked about: SHAPES (images) or SOUNDS (audio clips: a model with an audio tower)")
    p.add_argument("--model", default=None, help="checkpoint directory (evaluated through the serving engine, no HTTP)")
    p.add_argument("--url", default=None, help="server root, e.g. http://127.0.0.1:8000 (evaluates over HTTP)")
    p.add_argument("--served-model", default=None, help="the `model` field to send with --url")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-schema", action="store_true",
                   help="with --url: each answer constrained by response_format to its kind's answers")
    p.add_argument("--json", action="store_true", help="print the result as JSON (with up to 20 mistakes)")
    args = p.parse_args(argv)
    _setup(args.threads, logging.WARNING)  # a progress bar, then the table: no log line per request
    if (args.model is None) == (args.url is None):
        p.error("give exactly one of --model or --url")
    if args.json_schema and args.url is None:
        p.error("--json-schema goes with --url (it measures the server's structured outputs)")
    from .evaluate_sounds import NoAudioTower

    refused: tuple[type[Exception], ...] = (NoAudioTower,)  # a checkpoint that cannot hear (--world sounds)
    if args.url is not None:
        from vlmserve_client import VlmserveError

        refused = (NoAudioTower, VlmserveError)  # the server's error answer, or no server
    try:
        result = _evaluate(args)
    except refused as e:
        unheard = getattr(e, "code", None) == "unsupported_audio"
        hint = " (--world sounds needs a model with an audio tower)" if unheard else ""
        print(f"vlmserve eval: {e}{hint}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(result_table(result) + "\n")
    return 0


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The world's question set, answered through the engine (`--model`) or a server (`--url`), behind a progress
    bar on stderr."""
    url, model, schema = args.url, args.served_model, args.json_schema
    if args.world == "sounds":
        from .evaluate_sounds import evaluate_sounds_engine, evaluate_sounds_url, sounds_eval_items

        clips = sounds_eval_items(args.n, args.seed)
        with _bar(len(clips)) as bar:
            if url is None:
                return evaluate_sounds_engine(args.model, clips, progress=bar.update)
            return evaluate_sounds_url(url, clips, model=model, json_schema=schema, progress=bar.update)
    from .evaluate import eval_items, evaluate_engine, evaluate_url

    images = eval_items(args.n, args.seed)
    with _bar(len(images)) as bar:
        if url is None:
            return evaluate_engine(args.model, images, progress=bar.update)
        return evaluate_url(url, images, model=model, json_schema=schema, progress=bar.update)


def _bar(total: int) -> tqdm[Any]:
    return tqdm(total=total, desc="eval", unit="q", file=sys.stderr, dynamic_ncols=True)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(train_main(sys.argv[2:]) if sys.argv[1:2] == ["train"] else eval_main(sys.argv[2:]))
