"""The projector study: linear, MLP and Perceiver-Resampler projectors trained under the same stages and a shorter
common budget (recipes `table-*`), on the encoder and LM of a finished base run (stages 0 and 1 are shared).

    python -m vlmserve.training.table --base RUN_DIR --out TABLE_DIR [--n 500] [--variants linear mlp resampler]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from vlmserve.model.tokenizer import ChatTokenizer
from vlmserve.model.weights import load_model

from .evaluate import eval_items, evaluate_local, prefill_latency_ms, projector_params
from .recipe import get_recipe
from .stages import Run, run_stages

log = logging.getLogger(__name__)


def run_variant(base: Path, out: Path, projector: str, n_eval: int, seed: int, share: Run | None = None
                ) -> dict[str, Any]:
    """Train one projector variant (stages align + instruct) on the base run's encoder and LM, then measure it."""
    recipe = get_recipe(f"table-{projector}")
    prepare_variant_dir(base, out)
    summary = run_stages(recipe, out, ["align", "instruct"], resume=True, share=share)
    model_dir = out / "model"
    model = load_model(model_dir)
    chat = ChatTokenizer.from_pretrained(model_dir)
    result = evaluate_local(model_dir, eval_items(n_eval, seed))
    return {
        "projector": projector,
        "visual_tokens": model.config.num_visual_tokens,
        "projector_params": projector_params(model),
        "prefill_ms": round(prefill_latency_ms(model, chat, recipe.image_size), 2),
        "train_s": round(summary["stage_align"]["seconds"] + summary["stage_instruct"]["seconds"], 1),
        "color_alignment": round(summary["stage_align"]["color_alignment"], 3),
        "accuracy": result["accuracy"],
        "per_kind": {k: v["accuracy"] for k, v in result["per_kind"].items()},
        "n": result["n"],
    }


def prepare_variant_dir(base: Path, out: Path) -> None:
    """Copy the base run's tokenizer and stage 0-1 results (with their summary entries) into a variant's run dir."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "text").is_dir():
        shutil.copytree(base / "text", out / "text")
    base_summary = json.loads((base / "summary.json").read_text())
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    for stage in ("vision", "lm"):
        shutil.copy2(base / f"{stage}.pt", out / f"{stage}.pt")
        summary[f"stage_{stage}"] = base_summary[f"stage_{stage}"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as markdown."""
    kinds = ["color", "shape", "count", "exists", "caption"]
    head = ["projector", "visual tokens", "projector params", "prefill ms", "train s (align+instruct)",
            "colour alignment", "overall", *kinds]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["projector"], str(r["visual_tokens"]), f"{r['projector_params']:,}", f"{r['prefill_ms']:.1f}",
                 f"{r['train_s']:.0f}", f"{r['color_alignment']:.2f}", f"{r['accuracy']:.3f}",
                 *(f"{r['per_kind'][k]:.3f}" for k in kinds)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base", type=Path, required=True, help="a finished run of the `shapes` recipe")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", nargs="+", default=["linear", "mlp", "resampler"])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    torch.set_num_threads(args.threads)
    rows = []
    # The variants share the encoder, hence the rendered pool and its cached features.
    first = args.out / args.variants[0]
    prepare_variant_dir(args.base, first)
    share = Run(get_recipe(f"table-{args.variants[0]}"), first)
    for v in args.variants:
        rows.append(run_variant(args.base, args.out / v, v, args.n, args.seed, share))
        (args.out / "table.json").write_text(json.dumps(rows, indent=2))
        (args.out / "table.md").write_text(markdown(rows) + "\n")
        log.info("variant %s: %s", v, rows[-1])
    sys.stdout.write(markdown(rows) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
