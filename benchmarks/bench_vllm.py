"""vlmserve against vLLM's CPU build, side by side in one run, on one LLaVA checkpoint both load.

Per dtype (float32, bfloat16) and round, each server in turn (the order alternates between rounds) is started
fresh with the machine's default threads, warmed up, and then measured:

  load16   ../shared/tools/loadtest.py --concurrency 16 --requests 64 --max-tokens 64 --ignore-eos, 64 distinct images
  load1    the same with 1 stream x 8 requests
  turns    a chat about one image, single stream: a ~150-token system prompt, the image and a question, 8 tokens;
           then the second turn (the first answer and a new question appended); TTFT of each, 4 pairs

Every load gets images no earlier load used (benchmarks/shifted_loadtest.py), so that neither server's prefix cache
serves the headline loads; the turns measure exactly that cache. Before the servers, this process measures the GEMM
rates torch reaches at the workload's shapes (benchmarks/arithmetic_bound.py) and derives the arithmetic bound.

    python benchmarks/bench_vllm.py                       # both dtypes, 3 rounds (~40 min here)
    python benchmarks/bench_vllm.py --dtypes float32 --rounds 1 --small     # a dry run

The peer's venv comes from ../shared/tools/vllm_env.sh (`--vllm-python`, default $VLLM_PY). One JSON line goes to
stdout and to benchmarks/results/vllm.json; per-round ratios are in it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import arithmetic_bound, checkpoint_qwen2_vl  # noqa: E402
from benchmarks.bench_serving import (  # noqa: E402
    data_url,
    free_port,
    machine,
    noise_png,
    running_server,
    stream_messages,
)
from benchmarks.checkpoint import PEER, PEER_SMALL, ensure  # noqa: E402

log = logging.getLogger("bench_vllm")

GOALS = {  # metric: (comparison, bound), the ratios are ours / vLLM's
    "tok_per_s_16_vs_vllm": (">=", 1.2),
    "tok_per_s_1_vs_vllm": (">=", 1.2),
    "ttft_p50_16_vs_vllm": ("<=", 0.8),
    "share_of_arithmetic_bound_16": (">=", 0.8),
    "second_turn_ttft_ratio": ("<=", 0.3),
}
# Qwen2-VL's loads: 99, 192, 196 and 99 visual tokens at the processor's defaults (its image at its own resolution)
MIXED_SIZES = "320x240,448x336,392x392,240x320"
SYSTEM_WORDS = ["describe", "the", "picture", "number", "what", "color", "is", "this", "image", "shape"]


def shifted_load(args: argparse.Namespace, url: str, model: str, offset: int, concurrency: int, requests: int,
                 max_tokens: int) -> dict[str, Any]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "shifted_loadtest.py"), "--loadtest", str(args.loadtest),
           "--image-offset", str(offset), "--", "--base", url + "/v1", "--model", model, "--concurrency",
           str(concurrency), "--requests", str(requests), "--max-tokens", str(max_tokens), "--distinct-images",
           str(requests), "--ignore-eos"]
    if args.sizes:
        cmd[cmd.index("--"):cmd.index("--")] = ["--sizes", args.sizes]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load test failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    log.info("%s c=%d: %s", url, concurrency, result)
    return result


def image_url(seed: int) -> str:
    """A photo-like image of the load test's size, as a data URL."""
    return data_url(noise_png(seed, (160, 120)))


def stream(url: str, model: str, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    return stream_messages(url, model, messages, max_tokens, ignore_eos=True)


def system_prompt(ckpt: Path, tokens: int = 150) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    words: list[str] = []
    rng = random.Random(0)
    while len(tok(" ".join(words))["input_ids"]) < tokens:
        words.append(rng.choice(SYSTEM_WORDS))
    return " ".join(words) + "."


def turns(url: str, model: str, system: str, offset: int, pairs: int) -> dict[str, Any]:
    """TTFT of the first turn about a new image and of the second turn of the same chat, `pairs` times."""
    out = []
    for i in range(pairs):
        user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(offset + i)}},
                                            {"type": "text", "text": "what color is this shape"}]}
        messages = [{"role": "system", "content": system}, user]
        first = stream(url, model, messages, 8)
        messages += [{"role": "assistant", "content": first["text"]},
                     {"role": "user", "content": "and what shape is this image"}]
        second = stream(url, model, messages, 8)
        out.append({"first": first["ttft"], "second": second["ttft"], "ratio": second["ttft"] / first["ttft"],
                    "prompt_tokens": [first["usage"]["prompt_tokens"], second["usage"]["prompt_tokens"]],
                    "cached_tokens": ((second["usage"].get("prompt_tokens_details") or {}).get("cached_tokens"))})
    return {"pairs": out, "median_ratio": round(statistics.median(p["ratio"] for p in out), 3)}


def server_cmd(system: str, args: argparse.Namespace, ckpt: Path, dtype: str, port: int
               ) -> tuple[list[str], dict[str, str]]:
    if system == "ours":
        return ([sys.executable, "-m", "vlmserve.server.cli", "serve", "--model", str(ckpt), "--device", "cpu",
                 "--dtype", dtype, "--port", str(port), "--log-level", "warning"], {})
    return ([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--dtype", dtype,
             "--port", str(port), "--served-model-name", ckpt.name],
            {"VLLM_CPU_KVCACHE_SPACE": "4"})


def measure(system: str, args: argparse.Namespace, ckpt: Path, dtype: str, rnd: int, system_text: str,
            log_dir: Path) -> dict[str, Any]:
    port = free_port()
    cmd, env = server_cmd(system, args, ckpt, dtype, port)
    ready = "/ready" if system == "ours" else "/health"  # our /health is liveness; vLLM's answers once loaded
    with running_server(system, cmd, port, ready, log_dir, None, 600, env) as server:
        base = 100_000 * (rnd + 1) + (50_000 if system == "vllm" else 0)  # no image twice in a server's life
        warm = shifted_load(args, server.url, ckpt.name, base + 40_000, 16, 16, 8)
        if warm["n_errors"]:
            raise RuntimeError(f"{system}: the warm-up failed: {warm}")
        out = {"load16": shifted_load(args, server.url, ckpt.name, base, 16, args.requests, args.max_tokens),
               "load1": shifted_load(args, server.url, ckpt.name, base + 1000, 1, args.single_requests,
                                     args.max_tokens),
               "turns": turns(server.url, ckpt.name, system_text, base + 2000, args.pairs)}
        probe = stream(server.url, ckpt.name, [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url(base + 3000)}},
            {"type": "text", "text": "describe the picture number 12"}]}], 2)
        out["prompt_tokens"] = probe["usage"]["prompt_tokens"]
    for key in ("load16", "load1"):
        load = out[key]
        if load["n_errors"] or load["mean_tokens"] != args.max_tokens:
            raise RuntimeError(f"{system} {key}: errors or short answers: {load}")
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def round_ratios(ours: dict[str, Any], vllm: dict[str, Any]) -> dict[str, Any]:
    return {"tok_per_s_16_vs_vllm": ratio(ours["load16"]["tok_per_s"], vllm["load16"]["tok_per_s"]),
            "tok_per_s_1_vs_vllm": ratio(ours["load1"]["tok_per_s"], vllm["load1"]["tok_per_s"]),
            "ttft_p50_16_vs_vllm": ratio(ours["load16"]["ttft_p50"], vllm["load16"]["ttft_p50"]),
            "second_turn_ttft_ratio": ours["turns"]["median_ratio"],
            "second_turn_ttft_ratio_vllm": vllm["turns"]["median_ratio"]}


def run_dtype(args: argparse.Namespace, ckpt: Path, dtype: str, log_dir: Path) -> dict[str, Any]:
    system_text = system_prompt(ckpt)
    rounds: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        order = ["ours", "vllm"] if rnd % 2 == 0 else ["vllm", "ours"]
        result = {s: measure(s, args, ckpt, dtype, rnd, system_text, log_dir) for s in order if s not in args.skip}
        if len(result) == 2:
            result["ratios"] = round_ratios(result["ours"], result["vllm"])
            log.info("%s round %d: %s", dtype, rnd, result["ratios"])
        rounds.append(result)
    prompt_tokens = rounds[0]["ours"]["prompt_tokens"] if "ours" in rounds[0] else rounds[0]["vllm"]["prompt_tokens"]
    if args.family != "llava":  # the arithmetic bound is the LLaVA workload's (issue 11 sets no bound goal)
        return {"rounds": rounds, "prompt_tokens": prompt_tokens, "headline": headline(rounds)}
    shapes = arithmetic_bound.Shapes.of(ckpt)
    rates = arithmetic_bound.rates(shapes, getattr(torch, dtype), prompt_tokens, [16, 1])
    dt = getattr(torch, dtype)
    bound16 = arithmetic_bound.bound(shapes, rates, prompt_tokens, args.max_tokens, args.requests, 16, dt)
    bound1 = arithmetic_bound.bound(shapes, rates, prompt_tokens, args.max_tokens, args.single_requests, 1, dt)
    for r in rounds:
        for system in ("ours", "vllm"):
            if system in r:
                r[system]["share_of_bound_16"] = round(r[system]["load16"]["tok_per_s"] / bound16["tok_per_s"], 3)
                r[system]["share_of_bound_1"] = round(r[system]["load1"]["tok_per_s"] / bound1["tok_per_s"], 3)
                r[system]["share_of_bound_16_with_kv_reads"] = round(
                    r[system]["load16"]["tok_per_s"] / bound16["with_kv_reads"]["tok_per_s"], 3)
    return {"rounds": rounds, "gemm_rates": rates, "bound_16": bound16, "bound_1": bound1,
            "prompt_tokens": prompt_tokens, "headline": headline(rounds)}


def headline(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def med(values: list[float | None]) -> float | None:
        xs = [v for v in values if v is not None]
        return round(statistics.median(xs), 3) if xs else None

    out: dict[str, Any] = {}
    for key in ("tok_per_s_16_vs_vllm", "tok_per_s_1_vs_vllm", "ttft_p50_16_vs_vllm", "second_turn_ttft_ratio",
                "second_turn_ttft_ratio_vllm"):
        out[key] = med([r.get("ratios", {}).get(key) for r in rounds])
    out["share_of_arithmetic_bound_16"] = med([r["ours"].get("share_of_bound_16") for r in rounds if "ours" in r])
    out["share_of_arithmetic_bound_16_vllm"] = med([r["vllm"].get("share_of_bound_16") for r in rounds
                                                    if "vllm" in r])
    for system in ("ours", "vllm"):  # the roofline with the decode's KV reads (not a goal: see arithmetic_bound)
        out[f"share_of_bound_16_with_kv_reads_{system}"] = med(
            [r[system].get("share_of_bound_16_with_kv_reads") for r in rounds if system in r])
    for system in ("ours", "vllm"):
        for key in ("load16", "load1"):
            out[f"{system}_{key}_tok_per_s"] = med([r[system][key]["tok_per_s"] for r in rounds if system in r])
        out[f"{system}_load16_ttft_p50"] = med([r[system]["load16"]["ttft_p50"] for r in rounds if system in r])
    out["goals_met"] = {k: (out[k] is not None and (out[k] >= b if op == ">=" else out[k] <= b))
                        for k, (op, b) in GOALS.items()}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--single-requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--small", action="store_true", help="a reduced checkpoint (a dry run of the script)")
    p.add_argument("--family", choices=["llava", "qwen2_vl"], default="llava",
                   help="qwen2_vl: the Qwen2-VL checkpoint (benchmarks/checkpoint_qwen2_vl.py), images of mixed sizes")
    p.add_argument("--sizes", default=None, help="image sizes WxH,... for the loads (qwen2_vl default: a mix)")
    p.add_argument("--skip", action="append", default=[], choices=["ours", "vllm"])
    p.add_argument("--ckpt-dir", type=Path, default=Path("/tmp/vlmserve-bench"))
    p.add_argument("--checkpoint", type=Path, default=None, help="serve this checkpoint instead of the built one")
    p.add_argument("--loadtest", type=Path, default=ROOT.parent / "shared" / "tools" / "loadtest.py")
    p.add_argument("--vllm-python", default=os.environ.get("VLLM_PY", "python"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vllm.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.family == "qwen2_vl":
        qspec = checkpoint_qwen2_vl.PEER_SMALL if args.small else checkpoint_qwen2_vl.PEER
        ckpt = args.checkpoint or checkpoint_qwen2_vl.ensure(qspec, args.ckpt_dir)
        args.sizes = args.sizes or MIXED_SIZES
    else:
        ckpt = args.checkpoint or ensure(PEER_SMALL if args.small else PEER, args.ckpt_dir)
    log_dir = args.ckpt_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"benchmark": "vllm", "machine": machine(), "checkpoint": str(ckpt),
                              "args": {k: str(v) for k, v in vars(args).items()}}
    if (spec := ckpt / "bench_spec.json").is_file():
        result["spec"] = json.loads(spec.read_text())
    for dtype in args.dtypes.split(","):
        result[dtype] = run_dtype(args, ckpt, dtype, log_dir)
        log.info("%s headline: %s", dtype, result[dtype]["headline"])
    line = json.dumps(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(line)


if __name__ == "__main__":
    main()
