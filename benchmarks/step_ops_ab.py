"""Paired A/B of the compiled decode step in the engine thread: the C++ step ops (model/csrc/step_ops.cpp) against the
Python ops they replace, on one checkpoint, alternating per round.

    python benchmarks/step_ops_ab.py CHECKPOINT bfloat16 1 8      # dtype, streams, rounds

Two engine cores are built in a thread that then ends (one OpenMP team: see server/state.py), one with the C++ ops
and one without; each round runs `streams` requests of 64 tokens (an image each) on one core, then on the other
(order alternating), and reports the median step time of the last 40 steps (decode steps). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import threading
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

import vlmserve.server.engine.model_runner as model_runner
from vlmserve.model.images import ImageProcessor
from vlmserve.model.sampling import SamplingParams
from vlmserve.model.tokenizer import ChatTokenizer
from vlmserve.model.weights import load_model
from vlmserve.server.engine.core import EngineCore
from vlmserve.server.engine.prepare import RequestPreparer
from vlmserve.server.settings import Settings

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture please."}]}]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("dtype", choices=["float32", "bfloat16"])
    p.add_argument("streams", type=int)
    p.add_argument("rounds", type=int)
    args = p.parse_args()
    cores: dict[str, Any] = {}
    real = model_runner.step_ops

    def load() -> None:
        settings = Settings(model=args.checkpoint)
        tokenizer = ChatTokenizer.from_pretrained(args.checkpoint)
        for name in ("cpp", "python"):
            model_runner.step_ops = real if name == "cpp" else (lambda: None)  # type: ignore[assignment]
            model = load_model(args.checkpoint, device=torch.device("cpu"), dtype=getattr(torch, args.dtype))
            cores[name] = EngineCore(model, tokenizer, settings.engine_config())
            cores["prep"] = RequestPreparer(tokenizer, ImageProcessor.from_pretrained(args.checkpoint),
                                            model.config.num_visual_tokens, settings.image_limits())
        model_runner.step_ops = real

    thread = threading.Thread(target=load)
    thread.start()
    thread.join()
    assert cores["cpp"].runner._native is not None and cores["python"].runner._native is None
    counter = iter(range(10**9))

    def run(name: str) -> list[float]:
        core = cores[name]
        for _ in range(args.streams):
            n = next(counter)
            req = cores["prep"].request(f"r{n}", MESSAGES, [_png(n)], sampling=SamplingParams(temperature=0),
                                        max_tokens=64)
            req.ignore_eos = True
            core.add(core.make_sequence(req))
        times = []
        while core.has_work():
            t0 = time.perf_counter()
            core.step()
            times.append(time.perf_counter() - t0)
        return times

    for name in ("cpp", "python"):  # compile both graphs (one decode, several decodes)
        run(name)
        run(name)
    res: dict[str, list[float]] = {"cpp": [], "python": []}
    for r in range(args.rounds):
        for name in ("cpp", "python") if r % 2 == 0 else ("python", "cpp"):
            res[name].append(round(statistics.median(run(name)[-40:]) * 1e3, 2))
    ratios = [round(c / py, 3) for c, py in zip(res["cpp"], res["python"], strict=True)]
    print(json.dumps({"dtype": args.dtype, "streams": args.streams, "median_step_ms_last40": res,
                      "cpp_over_python": ratios, "median_ratio": statistics.median(ratios)}))


if __name__ == "__main__":
    main()
