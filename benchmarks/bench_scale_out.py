"""Scale-out benchmark: one process against Ray Serve with 2 replicas (image affinity, then round-robin routing).

What runs, each system a fresh server on a free port, one at a time, on benchmarks/checkpoint.py's encoder-heavy
PEER checkpoint (196 visual tokens an image; `--small`: PEER_SMALL):

  overhead    40 sequential text requests, max_tokens 1, not streamed: the p50 of end-to-end latency; Ray's minus
              one process's is the per-request cost of the proxy, the ingress and the routing hop. Measured twice:
              per system in turn, and paired (one process with one thread and Ray both up, 120 pairs of
              requests alternating between them: the median of the pairs' differences, the figure the summary
              gives); the same pairing for the streamed TTFT of one image both have cached (Ray: on its affinity
              replica). Every request goes over a kept-alive connection, one client per server
  repeat      8 images, each sent 3 times (sequentially, streamed, max_tokens 1): TTFT (to the token's chunk, not
              the role chunk that precedes the prefill) of first sight vs of the repeats. With affinity every
              repeat meets its replica's caches; with round-robin the first repeat lands on the other replica
              (cold), the second on one that saw it
  throughput  16 concurrent streaming clients, 48 requests with distinct images, 32 tokens each: tokens/s. Two
              replicas on 2 cores share those cores: this says what that costs, not what 2 accelerators give

    python benchmarks/bench_scale_out.py           # writes benchmarks/results/scale_out.json
    python benchmarks/bench_scale_out.py --small   # dry run

Logs go to stderr; one JSON line of results to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_serving import data_url, free_port, noise_png
from benchmarks.checkpoint import PEER, PEER_SMALL, ensure

log = logging.getLogger("bench_scale_out")
MODEL = "bench"


@contextmanager
def server(args: list[str], log_dir: Path, name: str, env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vlmserve.server.cli", "serve", "--port", str(port),
                                 "--served-model-name", MODEL, "--no-compile", *args], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 600:
                raise RuntimeError(f"{name} not ready after 600 s")
            time.sleep(0.2)
        log.info("%s ready in %.1f s", name, time.monotonic() - t0)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


_clients: dict[str, httpx.Client] = {}


def client(url: str) -> httpx.Client:
    """One kept-alive client per server, as the OpenAI SDK and the load test run: a client per call would put its
    set-up (~30 ms, its TLS context) and a TCP connect in every figure, noise larger than what is measured."""
    if url not in _clients:
        _clients[url] = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=64))
    return _clients[url]


def chat(url: str, content: Any, max_tokens: int) -> tuple[float, float, str, int, int]:
    """(TTFT s, e2e s, replica, completion tokens, cached prompt tokens) of one streamed chat request."""
    body = {"model": MODEL, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": content}]}
    t0 = time.perf_counter()
    ttft, tokens, cached = 0.0, 0, 0
    with client(url).stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        replica = r.headers.get("x-vlmserve-replica", "?")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            # the first token: the first chunk with text, or the finish chunk when the token decodes to no text
            # (the role chunk, content "", comes before the prefill and says nothing about it)
            choice = (event.get("choices") or [{}])[0]
            if not ttft and ((choice.get("delta") or {}).get("content") or choice.get("finish_reason")):
                ttft = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
                cached = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return ttft or time.perf_counter() - t0, time.perf_counter() - t0, replica, tokens, cached


def overhead(url: str, n: int) -> dict[str, float]:
    times = [text_request(url, i) for i in range(n + 5)][5:]  # warm connections and caches first
    return {"p50_ms": statistics.median(times) * 1e3, "p90_ms": sorted(times)[int(0.9 * len(times))] * 1e3}


def text_request(url: str, i: int) -> float:
    t0 = time.perf_counter()
    r = client(url).post(url + "/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": f"say {i % 7}"}]})
    r.raise_for_status()
    return time.perf_counter() - t0


def paired(one: str, ray: str, n: int, measure: Callable[[str, int], float]) -> dict[str, Any]:
    """Both servers up at once, requests alternating between them (the order flipped every pair), so that the
    machine's drift meets both alike: the median of the per-pair differences, Ray's minus one process's."""
    for i in range(5):
        measure(one, i), measure(ray, i)
    diffs, a, b = [], [], []
    for i in range(n):
        if i % 2:
            tb, ta = measure(ray, i), measure(one, i)
        else:
            ta, tb = measure(one, i), measure(ray, i)
        a.append(ta)
        b.append(tb)
        diffs.append(tb - ta)
    return {"pairs": n, "one_process_p50_ms": statistics.median(a) * 1e3, "ray_p50_ms": statistics.median(b) * 1e3,
            "overhead_p50_ms": statistics.median(diffs) * 1e3,
            "overhead_p10_p90_ms": [sorted(diffs)[int(q * n)] * 1e3 for q in (0.1, 0.9)]}


def image_part(png: bytes) -> list[dict[str, Any]]:
    return [{"type": "image_url", "image_url": {"url": data_url(png)}}, {"type": "text", "text": "describe it"}]


def repeat(url: str, seed: int) -> dict[str, Any]:
    first, repeats, same, hits = [], [], 0, 0
    for i in range(8):
        part = image_part(noise_png(seed + i))
        runs = [chat(url, part, 1) for _ in range(3)]
        first.append(runs[0][0])
        repeats += [r[0] for r in runs[1:]]
        same += len({r[2] for r in runs}) == 1
        hits += sum(1 for r in runs[1:] if r[4] > 0)
    return {"first_ttft_ms": statistics.median(first) * 1e3, "repeat_ttft_ms": statistics.median(repeats) * 1e3,
            "repeat_ttft_mean_ms": statistics.fmean(repeats) * 1e3, "images_on_one_replica": same,
            "repeats_with_cached_prefix": hits}


def throughput(url: str, seed: int, requests: int, clients: int, max_tokens: int) -> dict[str, Any]:
    parts = [image_part(noise_png(seed + i)) for i in range(requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: chat(url, p, max_tokens), parts))
    wall = time.perf_counter() - t0
    tokens = sum(r[3] for r in results)
    replicas: dict[str, int] = {}
    for r in results:
        replicas[r[2]] = replicas.get(r[2], 0) + 1
    return {"tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall, "tokens": tokens,
            "ttft_p50_ms": statistics.median(r[0] for r in results) * 1e3, "by_replica": replicas}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="reduced checkpoint and load (dry run)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale_out.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-scale-out-"))
    ckpt = ensure(PEER_SMALL if args.small else PEER, Path(tempfile.gettempdir()) / "vlmserve-bench-checkpoints")
    n, requests = (10, 16) if args.small else (40, 48)
    common = ["--model", str(ckpt), "--max-running", "16", "--max-waiting", "64"]
    ray_common = [*common, "--replicas", "2", "--replica-cpus", "0.9", "--ingress-cpus", "0.1"]
    systems = {"one_process": common, "one_process_1_thread": common, "ray_affinity": ray_common,
               "ray_round_robin": [*ray_common, "--replica-routing", "round_robin"]}
    results: dict[str, Any] = {"checkpoint": ckpt.name, "cpus": os.cpu_count()}
    for seed, (name, flags) in enumerate(systems.items()):
        # each replica runs torch on round(--replica-cpus) = 1 thread; one_process_1_thread matches that
        env = {"OMP_NUM_THREADS": "1"} if name == "one_process_1_thread" else {}
        with server(flags, work, name, env) as url:
            results[name] = {"overhead": overhead(url, n), "repeat": repeat(url, 1000 * (seed + 1)),
                             "throughput": throughput(url, 10_000 * (seed + 1), requests, 16, 32)}
            log.info("%s: %s", name, results[name])
    with server(common, work, "paired_one_process", {"OMP_NUM_THREADS": "1"}) as one_url, \
            server(ray_common, work, "paired_ray", {}) as ray_url:
        results["paired_overhead"] = paired(one_url, ray_url, 3 * n, text_request)
        log.info("paired overhead: %s", results["paired_overhead"])
        cached = image_part(noise_png(99))  # one image, cached on both after the warm-up pairs: TTFT, streamed
        results["paired_cached_image_ttft"] = paired(one_url, ray_url, n, lambda url, i: chat(url, cached, 1)[0])
        log.info("paired cached-image TTFT: %s", results["paired_cached_image_ttft"])
    one, aff, rr = results["one_process_1_thread"], results["ray_affinity"], results["ray_round_robin"]
    results["summary"] = {
        # same threads per engine; the paired figure is the one to read (the sequential one meets drift)
        "routing_overhead_p50_ms": results["paired_overhead"]["overhead_p50_ms"],
        "routing_overhead_p50_ms_sequential": aff["overhead"]["p50_ms"] - one["overhead"]["p50_ms"],
        "repeat_ttft_ms": {"one_process": one["repeat"]["repeat_ttft_ms"], "affinity": aff["repeat"]["repeat_ttft_ms"],
                           "round_robin": rr["repeat"]["repeat_ttft_ms"],
                           "round_robin_mean": rr["repeat"]["repeat_ttft_mean_ms"],
                           "first_sight": aff["repeat"]["first_ttft_ms"],
                           "affinity_minus_one_process_cached_paired": results["paired_cached_image_ttft"][
                               "overhead_p50_ms"]},
        "throughput_tokens_per_s": {k: results[k]["throughput"]["tokens_per_s"] for k in systems},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["summary"]))


if __name__ == "__main__":
    main()
