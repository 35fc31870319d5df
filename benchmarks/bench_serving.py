"""Serving benchmark: vlmserve against its peers, all in one run, on the same LLaVA-format checkpoint.

What runs (see benchmarks/README.md for the table and how to read it):

  ours        `vlmserve serve --max-running 16` under ../shared/tools/loadtest.py: 16 concurrent streaming chat
              requests, 64 requests, each with its own image, 32 tokens each
  serve       `transformers serve --continuous-batching` (the checkpoint forced) under the same load test
  generate    transformers' `generate` in this process, static left-padded batches of 16 (the same prompts and
              images, greedy, 32 new tokens): the best transformers does with no server at all
  single      single-stream decode tokens/s: our Engine in-process set up for one stream (max_running=1) vs
              `generate` at batch 1, 128 tokens; the 16-slot engine on the same stream is reported beside it
  repeat      TTFT of a repeated image vs a new one through our server, on the encoder-heavy checkpoint (separate:
              the headline load uses distinct images only, so it carries no cache advantage)

Every server is a subprocess on a free 127.0.0.1 port, stopped in a `finally`; no two systems run at once. The
checkpoints (benchmarks/checkpoint.py) make EOS unreachable, so every system generates exactly `max_tokens`; the
run checks it (usage, finish reasons, generated ids). Timings on a shared CPU are noisy: compare the ratios, which
come from the same run, and `--rounds` repeats the headline trio (ours, serve, generate) back to back.

    python benchmarks/bench_serving.py                 # full run, writes benchmarks/results/serving.json
    python benchmarks/bench_serving.py --small         # dry run on reduced checkpoints and load
    python benchmarks/bench_serving.py --profile       # also py-spy our server during its load test

Logs go to stderr; the one JSON line of results goes to stdout.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.checkpoint import build_all  # noqa: E402

log = logging.getLogger("bench_serving")

GOALS = {  # metric: (comparison, bound)
    "tok_per_s_vs_serve": (">=", 6.0),
    "tok_per_s_vs_generate": (">=", 1.0),
    "ttft_p50_vs_serve": ("<=", 0.25),
    "single_stream_decode_vs_generate": (">=", 1.5),
    "repeated_vs_new_image_ttft": ("<=", 0.5),
}


# ------------------------------------------------------------------------------------------------------ inputs
def loadtest_png(seed: int, size: tuple[int, int] = (160, 120)) -> bytes:
    """The image loadtest.py sends for `seed` (same code: a solid colour drawn from random.Random(seed))."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def noise_png(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    """A photo-like (incompressible) image for the repeated-image measurement."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, "PNG")
    return buf.getvalue()


def loadtest_prompt(i: int) -> str:
    return f"describe the picture number {i}"  # loadtest.py's text part


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def chat_messages(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def quantile(xs: list[float], f: float) -> float | None:
    """loadtest.py's quantile (nearest rank, no interpolation), so the in-process numbers compare like for like."""
    return sorted(xs)[min(len(xs) - 1, int(f * len(xs)))] if xs else None


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# ----------------------------------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the server's own process group (it was started in a new session), then SIGKILL if needed."""
        if self.process.poll() is not None:
            return
        pgid = self.process.pid  # start_new_session: the server leads its own group
        with suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %ss: SIGKILL", self.name, timeout)
            with suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            self.process.wait(10)


def server_env(threads: int | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A server's environment: offline, and `threads` intra-op threads (None: the machine's default, as users run
    it: every thread variable of ours removed)."""
    ours = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if threads is not None or k not in ours}
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1", **(extra or {})}


@contextmanager
def running_server(name: str, cmd: list[str], port: int, ready_path: str, log_dir: Path, threads: int | None,
                   timeout: float, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Start `cmd`, wait until GET `ready_path` answers 200 (bounded by `timeout`), always stop it afterwards."""
    log_path = log_dir / f"{name}-{port}.log"
    log.info("starting %s: %s", name, " ".join(cmd))
    with open(log_path, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=server_env(threads, env),
                                   start_new_session=True, cwd=log_dir)
    server = Server(name, f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{server.log_text()[-4000:]}")
            try:
                if httpx.get(server.url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout}s:\n{server.log_text()[-4000:]}")
            time.sleep(0.25)
        log.info("%s ready at %s", name, server.url)
        yield server
    finally:
        server.stop()


_CLIENT = httpx.Client(timeout=300)  # one client for every request: `httpx.stream` builds a client (and its TLS
# context) per call, ~30 ms of client time that would land in every TTFT


def stream_messages(url: str, model: str, messages: list[dict[str, Any]], max_tokens: int, *,
                    ignore_eos: bool = False) -> dict[str, Any]:
    """One streaming chat request; TTFT (first content delta), last delta, total time, text, usage, finish reason."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True, "messages": messages,
            "stream_options": {"include_usage": True}, **({"ignore_eos": True} if ignore_eos else {})}
    t0 = time.perf_counter()
    first = last = None
    usage, finish, text = None, None, []
    with _CLIENT.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:500]!r}")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                finish = choice.get("finish_reason") or finish
                if piece := (choice.get("delta") or {}).get("content"):
                    text.append(piece)
                    last = time.perf_counter() - t0
                    first = last if first is None else first
    return {"ttft": first, "last": last, "total": time.perf_counter() - t0, "text": "".join(text), "usage": usage,
            "finish": finish}


def stream_chat(url: str, model: str, png: bytes, text: str, max_tokens: int) -> dict[str, Any]:
    """One streaming chat request about one image (see `stream_messages`)."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                             {"type": "text", "text": text}]}]
    return stream_messages(url, model, messages, max_tokens)


def run_loadtest(loadtest: Path, url: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(loadtest), "--base", url + "/v1", "--model", model, "--concurrency",
           str(args.concurrency), "--requests", str(args.requests), "--max-tokens", str(args.max_tokens),
           "--distinct-images", str(args.requests)]
    log.info("load test: %s", " ".join(cmd[1:]))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.loadtest_timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loadtest failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    log.info("load test result: %s", result)
    return result


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc): robust to other load on the machine,
    unlike wall time (the load test client is a separate process and is not counted)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu(load: dict[str, Any], cpu_s: float) -> dict[str, Any]:
    tokens = load["tok_per_s"] * load["wall_s"]
    return {**load, "cpu_s": round(cpu_s, 2), "tok_per_cpu_s": round(tokens / cpu_s, 2) if cpu_s > 0 else None}


def scrape_metrics(url: str) -> dict[str, float]:
    """Our /metrics as {name (labels included): value}."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    keys = ["vlmserve:prefill_seconds_sum", "vlmserve:prefill_seconds_count", "vlmserve:decode_step_seconds_sum",
            "vlmserve:decode_step_seconds_count", "vlmserve:vision_encoder_seconds_sum",
            "vlmserve:vision_images_encoded_total", "vlmserve:vision_cache_hits_total",
            "vlmserve:vision_cache_misses_total", "vlmserve:batch_size_sum", "vlmserve:batch_size_count",
            "vlmserve:image_preprocess_seconds_sum", "vlmserve:generation_tokens_total",
            "vlmserve:prompt_tokens_total", 'vlmserve:request_success_total{finished_reason="length"}']
    return {k.removeprefix("vlmserve:"): round(after.get(k, 0.0) - before.get(k, 0.0), 4) for k in keys}


# ----------------------------------------------------------------------------------------------------- profile
@contextmanager
def py_spy(pid: int, out_path: Path, enabled: bool) -> Iterator[None]:
    """Sample `pid` with py-spy (collapsed stacks, one line per thread-qualified stack) while the block runs."""
    if not enabled:
        yield
        return
    beside = Path(sys.executable).with_name("py-spy")  # an unactivated virtual environment's own py-spy
    cmd = [str(beside) if beside.exists() else "py-spy", "record", "--pid", str(pid), "--format", "raw",
           "--rate", "100", "--threads", "--output", str(out_path), "--nonblocking"]
    try:
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    except FileNotFoundError:
        log.warning("py-spy is not installed (pip install py-spy): no profile")
        yield
        return
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate(timeout=10)
        if spy.returncode not in (0, -signal.SIGINT) and not out_path.exists():
            log.warning("py-spy failed (%s): %s", spy.returncode, err.decode(errors="replace")[-1000:])


# Where the engine thread's time goes: the first matching rule names a sample (frames are "func (file:line)").
_ENGINE_BUCKETS = [
    ("encode_images (vision encoder)", "_encode_images ("),
    ("prefill (LM forward)", "_prefill ("),
    ("decode forward", "decode_step ("),
    ("sampling", "sample ("),
    ("accept: detokenize, stops, stream", "_accept ("),
    ("waiting for work (queue)", "_apply_commands ("),
    ("decode step, other (host tensors, bookkeeping)", "_step ("),
    ("admission, other", "_admit ("),
]


_IDLE_LEAVES = ("select (selectors.py", "wait (threading.py", "get (queue.py", "_worker (concurrent")
_RUNTIME = ("thread (", "Thread.", "_bootstrap", "<module>", "_run_module_as_main", "_run_code", "main (server/cli.py",
            "cmd_serve", "Server.run", "Runner.run", "asyncio_run", "run_forever", "run_until_complete", "_run_once",
            "Handle._run", "Context.run", "Module._call_impl", "Module._wrapped_call_impl")


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Shares of samples: per thread kind, engine-thread buckets, and the functions with most inclusive time."""
    if not path.exists():
        return {}
    threads: Counter[str] = Counter()
    engine: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        total += count
        idle = any(key in frames[-1] for key in _IDLE_LEAVES)
        if any("_loop (" in f and "core.py" in f for f in frames):
            kind = "engine thread"
            engine[next((name for name, key in _ENGINE_BUCKETS if any(key in f for f in frames)), "other")] += count
        elif any("uvicorn" in f or "starlette" in f or "asyncio" in f for f in frames):
            kind = "event loop (HTTP, JSON, SSE)"
        elif any("preprocess" in f or "PIL" in f or "images.py" in f or "concurrent" in f for f in frames):
            kind = "preprocess pool (image decode, resize)"
        else:
            kind = "other"
        threads[kind + (" idle" if idle else " busy")] += count
        if not idle:
            for name in {f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0] + ")" for f in frames if " (" in f}:
                if not any(name.startswith(r) or r in name for r in _RUNTIME):
                    inclusive[name] += count
            leaf[frames[-1]] += count

    def shares(c: Counter[str], n: int | None = None) -> dict[str, float]:
        return {k: round(v / total, 3) for k, v in c.most_common(n)} if total else {}

    return {"samples": total, "threads": shares(threads), "engine_thread": shares(engine),
            "inclusive_busy_top": shares(inclusive, top), "leaf_busy_top": shares(leaf, 15)}


# --------------------------------------------------------------------------------------------------- phases
def phase_ours(ckpt: Path, args: argparse.Namespace, log_dir: Path, profile: bool) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "vlmserve.server.cli", "serve", "--model", str(ckpt), "--port", str(port),
           "--max-running", str(args.concurrency), "--device", "cpu", "--dtype", args.dtype, "--log-level", "warning",
           *(["--compile"] if args.compile else [])]
    with running_server("vlmserve", cmd, port, "/ready", log_dir, args.threads, args.server_timeout) as server:
        warm = stream_chat(server.url, ckpt.name, loadtest_png(10_000), "warm up", 4)  # an image of no later request
        before = scrape_metrics(server.url)
        prof_path = log_dir / f"py-spy-ours-{port}.txt"
        with py_spy(server.process.pid, prof_path, profile):
            cpu0 = cpu_seconds(server.process.pid)
            load = run_loadtest(args.loadtest, server.url, ckpt.name, args)
            load = with_cpu(load, cpu_seconds(server.process.pid) - cpu0)
        after = scrape_metrics(server.url)
    engine = metrics_delta(before, after)
    if engine["vision_cache_hits_total"]:
        log.warning("the headline load hit the visual-token cache %d times", engine["vision_cache_hits_total"])
    out = {"load": load, "engine": engine, "warmup_ttft": warm["ttft"]}
    if profile:
        out["profile"] = summarize_profile(prof_path)
        out["profile_raw"] = str(prof_path)
    return out


def phase_serve(ckpt: Path, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """`transformers serve --continuous-batching` on the forced checkpoint, and what it actually did."""
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    cmd = [str(exe), "serve", "--continuous-batching", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--dtype", args.dtype, "--log-level", "info", str(ckpt)]
    model = str(ckpt)  # a server pinned to a model answers only to that exact name
    with running_server("transformers-serve", cmd, port, "/health", log_dir, args.threads,
                        args.server_timeout) as server:
        # /health is up before the model: wait for /v1/models to list it (the forced model loads at start)
        deadline = time.monotonic() + args.server_timeout
        while model not in httpx.get(server.url + "/v1/models", timeout=10).text:
            if time.monotonic() > deadline:
                raise RuntimeError("transformers serve never listed the model")
            time.sleep(0.5)
        warm = stream_chat(server.url, model, loadtest_png(10_000), "warm up", 4)
        # Do two concurrent streams overlap? (continuous batching would interleave them)
        overlap = concurrency_probe(server.url, model, args.max_tokens)
        cpu0 = cpu_seconds(server.process.pid)
        load = run_loadtest(args.loadtest, server.url, model, args)
        load = with_cpu(load, cpu_seconds(server.process.pid) - cpu0)
        text = server.log_text()
    return {"load": load, "warmup_ttft": warm["ttft"], "overlap_probe": overlap,
            "log": {"cb_true": text.count("CB: True"), "cb_false": text.count("CB: False"),
                    "fallback_warning": "does not support continuous batching" in text,
                    "fallback_line": next((ln for ln in text.splitlines() if "continuous batching" in ln), None)}}


def concurrency_probe(url: str, model: str, max_tokens: int) -> dict[str, Any]:
    """Two requests at once: if the second's first token comes only after the first's last, they ran one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    starts: list[float] = []

    def one(i: int) -> dict[str, Any]:
        starts.append(time.perf_counter())
        return stream_chat(url, model, loadtest_png(20_000 + i), loadtest_prompt(i), max_tokens)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(one, range(2))
    first, second = sorted([a, b], key=lambda r: r["ttft"] or 0.0)
    sequential = (second["ttft"] or 0.0) >= (first["last"] or 0.0) - 0.01
    return {"first_ttft": first["ttft"], "first_last_token": first["last"], "second_ttft": second["ttft"],
            "sequential": sequential, "wall": round(time.perf_counter() - t0, 3)}


class _FirstCall:
    """A logits processor that notes when it is first called (after the prefill forward: the first token)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def load_hf(ckpt: Path, dtype: str = "float32") -> tuple[Any, Any]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(ckpt)
    processor.tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=getattr(torch, dtype)).eval()
    return model, processor


def phase_generate(model: Any, processor: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Static left-padded batches of `concurrency`, the load test's prompts and images, greedy, `max_tokens` new."""
    from transformers import LogitsProcessorList

    eos = model.generation_config.eos_token_id
    ttfts, ttfts_from_start, prefill, new_tokens, preprocess = [], [], [], [], 0.0
    exact = True
    with torch.inference_mode():  # warm-up (lazy init, allocator) on an image of no timed request
        warm = processor(images=[Image.open(io.BytesIO(loadtest_png(10_000))).convert("RGB")],
                         text=[processor.apply_chat_template(chat_messages("warm up"), add_generation_prompt=True)],
                         return_tensors="pt")
        model.generate(**warm, max_new_tokens=2, do_sample=False)
    t_start, cpu0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for lo in range(0, args.requests, args.concurrency):
            ids = range(lo, min(lo + args.concurrency, args.requests))
            t_batch = time.perf_counter()
            images = [Image.open(io.BytesIO(loadtest_png(i))).convert("RGB") for i in ids]
            texts = [processor.apply_chat_template(chat_messages(loadtest_prompt(i)), add_generation_prompt=True)
                     for i in ids]
            inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
            preprocess += time.perf_counter() - t_batch
            first = _FirstCall()
            out = model.generate(**inputs, max_new_tokens=args.max_tokens, do_sample=False,
                                 logits_processor=LogitsProcessorList([first]))
            gen = out[:, inputs["input_ids"].shape[1]:]  # (B, max_tokens)
            exact &= gen.shape[1] == args.max_tokens and not bool((gen == eos).any())
            new_tokens.append(int(gen.numel()))
            assert first.at is not None
            prefill.append(first.at - t_batch)
            ttfts += [first.at - t_batch] * len(ids)  # closed loop: a batch's requests are sent when it starts
            ttfts_from_start += [first.at - t_start] * len(ids)  # open loop: all requests sent at t=0
    wall, cpu = time.perf_counter() - t_start, time.process_time() - cpu0
    return {"wall_s": round(wall, 3), "tok_per_s": round(sum(new_tokens) / wall, 2), "ok": args.requests,
            "cpu_s": round(cpu, 2), "tok_per_cpu_s": round(sum(new_tokens) / cpu, 2),
            "ttft_p50": quantile(ttfts, 0.5), "ttft_p95": quantile(ttfts, 0.95),
            "ttft_p50_all_sent_at_start": quantile(ttfts_from_start, 0.5),
            "batch_prefill_s": [round(p, 3) for p in prefill], "preprocess_s": round(preprocess, 3),
            "prompt_len_padded": int(inputs["input_ids"].shape[1]), "all_exactly_max_tokens_no_eos": exact}


class _TokenTimes:
    """A `generate` streamer that only notes when each new token arrives (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:
            self._prompt = False
            return
        self.times.extend([time.perf_counter()] * int(value.numel()))

    def end(self) -> None:
        pass


def decode_rate(times: list[float]) -> float | None:
    """Decode-only tokens/s: (n - 1) tokens over the time from the first token to the last (no prefill)."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None


@dataclass
class InProcess:
    """Our engine in this process (no HTTP): the model, the request preparer and a started Engine."""

    engine: Any
    preparer: Any

    @classmethod
    def start(cls, ckpt: Path, max_running: int, compile_steps: bool = False, dtype: str = "float32") -> InProcess:
        from vlmserve.model.images import ImageProcessor
        from vlmserve.model.tokenizer import ChatTokenizer
        from vlmserve.model.weights import load_model
        from vlmserve.server.engine import Engine, EngineConfig
        from vlmserve.server.engine.prepare import RequestPreparer

        model = load_model(ckpt, device=torch.device("cpu"), dtype=getattr(torch, dtype))
        tokenizer = ChatTokenizer.from_pretrained(ckpt)
        preparer = RequestPreparer(tokenizer, ImageProcessor.from_pretrained(ckpt), model.config.num_visual_tokens)
        config = EngineConfig(max_running=max_running, compile=compile_steps)
        engine = Engine(model, tokenizer, config, model_id=ckpt.name).start()
        return cls(engine, preparer)

    def request(self, request_id: str, png: bytes, text: str, max_tokens: int) -> Any:
        from vlmserve.model.sampling import SamplingParams

        return self.preparer.request(request_id, chat_messages(text), [png], sampling=SamplingParams(temperature=0.0),
                                     max_tokens=max_tokens)

    def run(self, request_id: str, png: bytes, text: str, max_tokens: int) -> tuple[float, list[float]]:
        """Prepare (image decode + preprocess, tokenize) and generate one request; (start, time of each token)."""
        from vlmserve.server.engine import Finished, TextDelta

        t0 = time.perf_counter()
        req = self.request(request_id, png, text, max_tokens)
        times: list[float] = []
        for event in self.engine.generate(req):
            if isinstance(event, TextDelta):
                times.extend([time.perf_counter()] * len(event.token_ids))
            elif isinstance(event, Finished):
                tail = event.usage.completion_tokens - len(times)  # tokens whose text came with the flush
                times.extend([time.perf_counter()] * max(tail, 0))
                if event.finish_reason != "length" or event.usage.completion_tokens != max_tokens:
                    raise RuntimeError(f"ours: {event.finish_reason} after {event.usage.completion_tokens}")
            else:
                raise RuntimeError(f"ours failed: {event}")
        return t0, times


def phase_engine(ours: InProcess, args: argparse.Namespace) -> dict[str, Any]:
    """Diagnostic: the load test's workload against our Engine in this process, no HTTP (closed loop of
    `concurrency` client threads), to separate the engine from the server around it."""
    from concurrent.futures import ThreadPoolExecutor

    ours.run("engine-warmup", loadtest_png(10_000), "warm up", 2)
    hits0 = ours.engine.counters.vision_cache_hits
    t_start, cpu0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(args.concurrency) as pool:
        runs = list(pool.map(lambda i: ours.run(f"engine-{i}-{time.monotonic_ns()}", loadtest_png(i),
                                                loadtest_prompt(i), args.max_tokens), range(args.requests)))
    wall, cpu = time.perf_counter() - t_start, time.process_time() - cpu0
    ttfts = [times[0] - t0 for t0, times in runs]
    tokens = sum(len(t) for _, t in runs)
    return {"wall_s": round(wall, 3), "tok_per_s": round(tokens / wall, 2), "cpu_s": round(cpu, 2),
            "tok_per_cpu_s": round(tokens / cpu, 2),
            "ttft_p50": quantile(ttfts, 0.5), "ttft_p95": quantile(ttfts, 0.95),
            "cache_hits": ours.engine.counters.vision_cache_hits - hits0}


def phase_single(single_ip: InProcess, batched_ip: InProcess, model: Any, processor: Any,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Batch-1 decode tokens/s: our Engine in-process vs `generate`, same prompt and image, interleaved reps.

    `ours` is an engine set up for one stream (`max_running=1`, so `auto` lays the weights out for 1-row GEMVs);
    `ours_16_slots` is the load test's engine (16 slots, weights packed for batches) running the same single stream.
    """
    text, n = loadtest_prompt(0), args.single_tokens
    eos = model.generation_config.eos_token_id

    def runner(ip: InProcess) -> Callable[[int], tuple[list[float], float, int]]:
        def ours(rep: int) -> tuple[list[float], float, int]:
            t0, times = ip.run(f"single-{rep}-{time.monotonic_ns()}", loadtest_png(30_000 + rep), text, n)
            return times, t0, len(times)  # a new image each rep: no cache hit
        return ours

    def theirs(rep: int) -> tuple[list[float], float, int]:
        image = Image.open(io.BytesIO(loadtest_png(30_000 + rep))).convert("RGB")
        prompt = processor.apply_chat_template(chat_messages(text), add_generation_prompt=True)
        timer = _TokenTimes()
        t0 = time.perf_counter()
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=n, do_sample=False, streamer=timer)
        gen = out[0, inputs["input_ids"].shape[1]:]
        if gen.numel() != n or bool((gen == eos).any()):
            raise RuntimeError(f"generate: {gen.numel()} tokens, EOS inside: {bool((gen == eos).any())}")
        return timer.times, t0, int(gen.numel())

    systems = {"ours": runner(single_ip), "ours_16_slots": runner(batched_ip), "generate": theirs}
    for fn in systems.values():
        fn(-1)  # warm-up (lazy init, allocator)
    rates: dict[str, list[float]] = {name: [] for name in systems}
    ttft: dict[str, list[float]] = {name: [] for name in systems}
    for rep in range(args.single_reps):
        for name, fn in systems.items():
            times, t0, _ = fn(rep)
            rate = decode_rate(times)
            if rate is not None:
                rates[name].append(rate)
            ttft[name].append(times[0] - t0)
            log.info("single stream %s rep %d: %.1f tok/s decode, TTFT %.3fs", name, rep, rate or 0, ttft[name][-1])
    out: dict[str, Any] = {"tokens": n, "reps": args.single_reps,
                           "weight_layouts": {"ours": single_ip.engine.weight_layout,
                                              "ours_16_slots": batched_ip.engine.weight_layout}}
    for name in systems:
        out[f"{name}_decode_tok_per_s"] = [round(r, 2) for r in rates[name]]
        out[f"{name}_median"] = round(median(rates[name]) or 0, 2)
        out[f"{name}_ttft_median"] = round(median(ttft[name]) or 0, 4)
    out["ours_16_slots_vs_generate"] = ratio(out["ours_16_slots_median"], out["generate_median"])
    return out


def phase_repeat(ckpt: Path, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Sequential pairs through our server: a new image, then the same bytes again; TTFT of each."""
    port = free_port()
    cmd = [sys.executable, "-m", "vlmserve.server.cli", "serve", "--model", str(ckpt), "--port", str(port),
           "--device", "cpu", "--dtype", args.dtype, "--log-level", "warning"]
    pairs = []
    with running_server("vlmserve-encoder-heavy", cmd, port, "/ready", log_dir, args.threads,
                        args.server_timeout) as server:
        stream_chat(server.url, ckpt.name, noise_png(99_999), "warm up", 2)
        before = scrape_metrics(server.url)
        for k in range(args.pairs):
            png = noise_png(40_000 + k)
            new = stream_chat(server.url, ckpt.name, png, loadtest_prompt(k), args.repeat_tokens)
            again = stream_chat(server.url, ckpt.name, png, loadtest_prompt(k), args.repeat_tokens)
            pairs.append({"new": round(new["ttft"], 4), "repeated": round(again["ttft"], 4),
                          "ratio": round(again["ttft"] / new["ttft"], 3)})
            log.info("repeated-image pair %d: %s", k, pairs[-1])
        engine = metrics_delta(before, scrape_metrics(server.url))
    images = engine["vision_images_encoded_total"]
    return {"pairs": pairs, "median_ratio": round(median([p["ratio"] for p in pairs]) or 0, 3),
            "median_new_ttft": median([p["new"] for p in pairs]),
            "median_repeated_ttft": median([p["repeated"] for p in pairs]),
            "cache_hits": engine["vision_cache_hits_total"], "images_encoded": images,
            "encoder_s_per_image": round(engine["vision_encoder_seconds_sum"] / images, 4) if images else None}


# ------------------------------------------------------------------------------------------------------- main
def machine() -> dict[str, Any]:
    model_name = next((ln.split(":", 1)[1].strip() for ln in _lscpu().splitlines() if ln.startswith("Model name")),
                      platform.processor())
    import transformers

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    return {"cpu": model_name, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": commit, "loadavg_start": os.getloadavg()}


def _lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def checks(rounds: list[dict[str, Any]], repeat: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, bool]:
    """Was every comparison fair? Exactly `max_tokens` everywhere, no errors, no cache hits in the headline load."""
    loads = [r[k]["load"] for r in rounds for k in ("ours", "serve") if k in r]
    out = {
        "loadtests_all_ok_exact_tokens": all(ld["ok"] == args.requests and ld["n_errors"] == 0
                                             and ld["mean_tokens"] == args.max_tokens for ld in loads),
        "generate_exact_tokens_no_eos": all(r["generate"]["all_exactly_max_tokens_no_eos"] for r in rounds
                                            if "generate" in r),
        "headline_no_vision_cache_hits": all(r["ours"]["engine"]["vision_cache_hits_total"] == 0 for r in rounds
                                             if "ours" in r),
        "serve_ran_sequentially": all(r["serve"]["overlap_probe"]["sequential"] and r["serve"]["log"]["cb_true"] == 0
                                      for r in rounds if "serve" in r),
    }
    if repeat is not None:
        # each image encoded once: the repeat is served from the visual-token cache or, with prefix caching, from
        # the KV blocks of the first request (which never consults the encoder or its cache)
        out["repeat_never_reencodes"] = repeat["images_encoded"] == len(repeat["pairs"])
    for key, ok in out.items():
        if not ok and key != "serve_ran_sequentially":
            log.warning("check failed: %s", key)
    return out


def headline(rounds: list[dict[str, Any]], single: dict[str, Any] | None,
             repeat: dict[str, Any] | None) -> dict[str, Any]:
    """Per-round ratios (each from systems run back to back) and their medians, against the goals."""
    per_round: dict[str, list[float]] = {k: [] for k in GOALS}
    for r in rounds:
        ours, serve, gen = r.get("ours", {}).get("load"), r.get("serve", {}).get("load"), r.get("generate")
        if ours and serve:
            per_round["tok_per_s_vs_serve"].append(ratio(ours["tok_per_s"], serve["tok_per_s"]))
            per_round["ttft_p50_vs_serve"].append(ratio(ours["ttft_p50"], serve["ttft_p50"]))
        if ours and gen:
            per_round["tok_per_s_vs_generate"].append(ratio(ours["tok_per_s"], gen["tok_per_s"]))
    if single:
        per_round["single_stream_decode_vs_generate"].append(ratio(single["ours_median"], single["generate_median"]))
    if repeat:
        per_round["repeated_vs_new_image_ttft"].append(repeat["median_ratio"])
    diagnostics: dict[str, list[float]] = {"tok_per_cpu_s_vs_serve": [], "tok_per_cpu_s_vs_generate": [],
                                           "engine_in_process_tok_per_s_vs_generate": [],
                                           "server_tok_per_s_vs_engine_in_process": []}
    for r in rounds:
        ours, gen, eng = r.get("ours", {}).get("load"), r.get("generate"), r.get("engine_in_process")
        serve = r.get("serve", {}).get("load")
        if ours and serve:
            diagnostics["tok_per_cpu_s_vs_serve"].append(ratio(ours["tok_per_cpu_s"], serve["tok_per_cpu_s"]))
        if ours and gen:
            diagnostics["tok_per_cpu_s_vs_generate"].append(ratio(ours["tok_per_cpu_s"], gen["tok_per_cpu_s"]))
        if eng and gen:
            diagnostics["engine_in_process_tok_per_s_vs_generate"].append(ratio(eng["tok_per_s"], gen["tok_per_s"]))
        if eng and ours:
            diagnostics["server_tok_per_s_vs_engine_in_process"].append(ratio(ours["tok_per_s"], eng["tok_per_s"]))
    out: dict[str, Any] = {}
    for key, values in diagnostics.items():
        out[key] = {"value": round(median(values), 3) if values else None, "per_round": values, "goal": None,
                    "met": None}
    for key, (op, bound) in GOALS.items():
        values = [v for v in per_round[key] if v is not None]
        value = round(median(values), 3) if values else None
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[key] = {"value": value, "per_round": values, "goal": f"{op} {bound}", "met": met}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="dry run: reduced checkpoints and load")
    p.add_argument("--ckpt-dir", type=Path, default=Path(tempfile.gettempdir()) / "vlmserve-bench-ckpt",
                   help="where the checkpoints are built (reused if present)")
    p.add_argument("--loadtest", type=Path, default=ROOT.parent / "shared" / "tools" / "loadtest.py")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="results directory (serving.json, or serving-small.json with --small)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads of every system (OMP_NUM_THREADS for the servers)")
    p.add_argument("--concurrency", type=int, default=None, help="default 16 (8 with --small)")
    p.add_argument("--requests", type=int, default=None, help="default 64 (16 with --small)")
    p.add_argument("--max-tokens", type=int, default=None, help="default 32 (8 with --small)")
    p.add_argument("--rounds", type=int, default=None, help="repeats of the ours/serve/generate/engine set (default 3)")
    p.add_argument("--single-tokens", type=int, default=None, help="default 128 (32 with --small)")
    p.add_argument("--compile", action="store_true", help="our engine with torch.compile'd decode steps")
    p.add_argument("--single-reps", type=int, default=None, help="default 3 (1 with --small)")
    p.add_argument("--pairs", type=int, default=None, help="repeated-image pairs, default 5 (2 with --small)")
    p.add_argument("--repeat-tokens", type=int, default=4, help="max_tokens of the repeated-image requests")
    p.add_argument("--skip", action="append", default=[], help="leave a phase out (repeatable)",
                   choices=["ours", "serve", "generate", "engine", "single", "repeat"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and activations of every system (default float32)")
    p.add_argument("--profile", action="store_true",
                   help="one more load test on our server under py-spy (pip install py-spy), reported apart")
    p.add_argument("--server-timeout", type=float, default=240, help="seconds a server may take to become ready")
    p.add_argument("--loadtest-timeout", type=float, default=1200, help="seconds one load test may take")
    args = p.parse_args(argv)
    small = args.small
    defaults = {"concurrency": (16, 8), "requests": (64, 16), "max_tokens": (32, 8), "rounds": (3, 1),
                "single_tokens": (128, 32), "single_reps": (3, 1), "pairs": (5, 2)}
    for key, (full, dry) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, dry if small else full)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    if not args.loadtest.is_file():
        raise SystemExit(f"loadtest.py not found at {args.loadtest} (--loadtest)")
    ckpts = build_all(args.ckpt_dir, small=args.small)
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="vlmserve-bench-"))
    log.info("checkpoints %s; server logs in %s", {k: str(v) for k, v in ckpts.items()}, log_dir)
    skip = set(args.skip)
    t_run = time.perf_counter()
    result: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(["python", "benchmarks/bench_serving.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "checkpoints": {k: json.loads((v / "bench_spec.json").read_text()) for k, v in ckpts.items()},
    }
    hf: tuple[Any, Any] | None = None
    ours_ip: InProcess | None = None

    def timed(name: str, fn: Callable[..., dict[str, Any]], *fn_args: Any) -> dict[str, Any]:
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        log.info("phase %s (1-minute load average %.2f)", name, load0)
        out = fn(*fn_args)
        out["phase_s"] = round(time.perf_counter() - t0, 1)
        out["loadavg_1m_before_after"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        return out

    rounds: list[dict[str, Any]] = []
    single = repeat = None
    single_ip: InProcess | None = None
    try:
        for r in range(args.rounds):
            log.info("round %d of %d", r + 1, args.rounds)
            this: dict[str, Any] = {}
            if "ours" not in skip:
                this["ours"] = timed("ours", phase_ours, ckpts["main"], args, log_dir, False)
            if "serve" not in skip:
                this["serve"] = timed("serve", phase_serve, ckpts["main"], args, log_dir)
            if "generate" not in skip:
                hf = hf or load_hf(ckpts["main"], args.dtype)
                this["generate"] = timed("generate", phase_generate, *hf, args)
            if "engine" not in skip:
                ours_ip = ours_ip or InProcess.start(ckpts["main"], args.concurrency, args.compile, args.dtype)
                this["engine_in_process"] = timed("engine", phase_engine, ours_ip, args)
            rounds.append(this)
        result["rounds"] = rounds
        if args.profile:  # an extra load test under py-spy, apart from the headline numbers (sampling costs CPU)
            result["ours_profiled"] = timed("ours-profiled", phase_ours, ckpts["main"], args, log_dir, True)
        if "single" not in skip:
            hf = hf or load_hf(ckpts["main"], args.dtype)
            ours_ip = ours_ip or InProcess.start(ckpts["main"], args.concurrency, args.compile, args.dtype)
            single_ip = InProcess.start(ckpts["main"], 1, args.compile, args.dtype)
            single = result["single_stream"] = timed("single", phase_single, single_ip, ours_ip, *hf, args)
    finally:
        for ip in (ours_ip, single_ip):
            if ip is not None:
                ip.engine.shutdown(timeout=10)
    hf = ours_ip = single_ip = None
    if "repeat" not in skip:
        repeat = result["repeated_image"] = timed("repeat", phase_repeat, ckpts["encoder-heavy"], args, log_dir)
    result["checks"] = checks(rounds, repeat, args)
    result["headline"] = headline(rounds, single, repeat)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["total_s"] = round(time.perf_counter() - t_run, 1)
    name = "serving" + ("-small" if args.small else "") + ("" if args.dtype == "float32" else f"-{args.dtype}")
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1))
    log.info("wrote %s", path)
    for key, h in result["headline"].items():
        log.info("%-34s %-8s goal %-7s met: %s  (per round %s)", key, h["value"], h["goal"], h["met"], h["per_round"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
