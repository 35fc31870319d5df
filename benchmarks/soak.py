"""Soak: thousands of image requests against one server, its memory (RSS) and latency sampled along the way.

Not a unit test. Each request carries its own image (mixed sizes from 32x32 to 1920x1080, PNG and JPEG, a few
repeated so the visual-token cache both hits and misses), over both endpoints (chat with a data URL, multipart
generate), streamed or not, and a share of the streaming clients hang up after their first chunk. Concurrency is
bounded; the run stops after `--requests` or `--duration`, whichever comes first. Every `--sample-every` requests
the server's RSS (psutil if installed, else /proc/PID/status), open file descriptors and threads are sampled, with
the latency percentiles of the window. Memory must level off: after the warm-up, the second half of the run may
not keep growing (see `leveled_off` in the summary).

With `--audio-rate R`, a share R of the requests also carries an audio clip (WAV, FLAC or MP3, 8 to 48 kHz, mono or
stereo, 0.3 s to `--max-clip-seconds`, a few repeated: audio-token cache hits), as an `input_audio` part after the
image (chat) or an `audio` file (generate); the server started here then serves the tiny LLaVA checkpoint with an
audio tower beside it (tests/audio_checkpoints.py; its window is 5 s).

The visual-token cache is bounded by `--vision-cache-mb` (256 MB by default), but on the tiny test model an entry is
4 KB, so filling it would take some 65 000 distinct images: a soak would only ever see it grow. The server started
here therefore gets `--vision-cache-mb 1` (this script's `--vision-cache-mb`), so that the cache is full after a few
hundred images and any other growth shows; pass `--vision-cache-mb 256` to watch the cache fill instead.

    python benchmarks/soak.py                          # tiny test checkpoint, 10000 requests, at most 240 s
    python benchmarks/soak.py --requests 500 --duration 60
    python benchmarks/soak.py --model /path/to/llava   # another checkpoint, started here
    python benchmarks/soak.py --url http://127.0.0.1:8000 --pid 1234   # a running server (RSS needs its pid)
    python benchmarks/soak.py --audio-rate 0.5         # half the requests with a clip (tiny LLaVA + audio tower)

Logs go to stderr; the JSON result goes to stdout and to benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("soak")

SIZES = [(32, 32), (64, 48), (160, 120), (224, 224), (336, 336), (640, 480), (1024, 768), (1920, 1080), (4000, 40)]


# -------------------------------------------------------------------------------------------------------- server
@dataclass
class Server:
    url: str
    model: str
    pid: int | None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, work: Path, extra: list[str]) -> Server:
    port = free_port()
    log_path = work / "server.log"
    cmd = [sys.executable, "-m", "vlmserve.server.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--log-level", "warning", *extra]
    with open(log_path, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    server = Server(f"http://127.0.0.1:{port}", "", process.pid, process, log_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                server.model = httpx.get(server.url + "/v1/models", timeout=5).json()["data"][0]["id"]
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError("server not ready after 300 s")


def tiny_checkpoint(work: Path, audio: bool = False) -> Path:
    """The test suite's tiny random CLIP + Llama checkpoint (tests/checkpoints.py), built here; with `audio`, the
    same with an audio tower in `audio/` (tests/audio_checkpoints.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    if audio:
        from audio_checkpoints import build_llava_audio

        return build_llava_audio(work / "tiny-llava-audio")
    from checkpoints import SPECS, build_checkpoint

    return build_checkpoint(SPECS["clip-llama"], work / "tiny-llava")


# ----------------------------------------------------------------------------------------------- process memory
def sample_process(pid: int | None) -> dict[str, float | None]:
    """RSS (MB), open file descriptors and threads of the server process."""
    if pid is None:
        return {"rss_mb": None, "fds": None, "threads": None}
    try:
        import psutil

        p = psutil.Process(pid)
        return {"rss_mb": p.memory_info().rss / 2**20, "fds": p.num_fds(), "threads": p.num_threads()}
    except ImportError:
        status = Path(f"/proc/{pid}/status").read_text()
        rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024  # type: ignore[union-attr]
        threads = int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]
        return {"rss_mb": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads}


# ------------------------------------------------------------------------------------------------------ requests
def make_image(i: int, rng: random.Random) -> tuple[bytes, str]:
    """A distinct image (its index is drawn into it), of a size and format drawn from the mix."""
    width, height = rng.choice(SIZES)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = (x0, y0, x0 + rng.randrange(1, width), y0 + rng.randrange(1, height))
        draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    draw.text((2, 2), str(i), fill=(255, 255, 255))
    buf = io.BytesIO()
    if rng.random() < 0.5:
        image.save(buf, "PNG", compress_level=1)
        return buf.getvalue(), "image/png"
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue(), "image/jpeg"


def make_clip(i: int, rng: random.Random, max_seconds: float) -> tuple[bytes, str]:
    """A distinct clip (its tone drawn from the index): format, rate, channels and length from the mix."""
    import numpy as np
    import soundfile as sf

    fmt = rng.choice(["WAV", "FLAC", "MP3"])
    rate = rng.choice([8000, 16000, 22050, 44100, 48000])
    t = np.arange(int(rng.uniform(0.3, max_seconds) * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * (200 + i % 997) * t)
    if rng.random() < 0.5:
        wave = np.stack([wave, 0.5 * wave], axis=1)
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), rate, format=fmt,
             subtype={"WAV": "PCM_16", "FLAC": "PCM_16", "MP3": "MPEG_LAYER_III"}[fmt])
    return buf.getvalue(), fmt.lower()


@dataclass
class Outcome:
    index: int
    status: int
    latency: float
    kind: str


@dataclass
class Run:
    args: argparse.Namespace
    server: Server
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    window: list[Outcome] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def sample(self) -> None:
        latencies = sorted(o.latency for o in self.window if o.status == 200 and not o.kind.startswith("disconnect"))
        statuses = Counter(o.status for o in self.window)
        process = sample_process(self.server.pid)
        entry = {"requests": len(self.outcomes), "t_s": round(time.monotonic() - self.started, 1),
                 **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in process.items()},
                 "p50_ms": percentile_ms(latencies, 0.5), "p95_ms": percentile_ms(latencies, 0.95),
                 "statuses": {str(k): v for k, v in sorted(statuses.items())}}
        self.samples.append(entry)
        self.window = []
        log.info("%s", json.dumps(entry))


def percentile_ms(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return round(1000 * sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))], 1)


async def one_request(client: httpx.AsyncClient, run: Run, i: int, rng: random.Random,
                      recent: list[tuple[bytes, str]], recent_clips: list[tuple[bytes, str]]) -> Outcome:
    args, server = run.args, run.server
    if recent and rng.random() < args.repeat_rate:
        data, mime = rng.choice(recent)  # a repeated image: a visual-token cache hit
    else:
        data, mime = await asyncio.to_thread(make_image, i, rng)
        recent.append((data, mime))
        del recent[:-32]
    clip: tuple[bytes, str] | None = None
    if rng.random() < args.audio_rate:
        if recent_clips and rng.random() < args.repeat_rate:
            clip = rng.choice(recent_clips)  # a repeated clip: an audio-token cache hit
        else:
            clip = await asyncio.to_thread(make_clip, i, rng, args.max_clip_seconds)
            recent_clips.append(clip)
            del recent_clips[:-32]
    stream = rng.random() < args.stream_rate
    hang_up = stream and rng.random() < args.disconnect_rate
    max_tokens = rng.randint(1, args.max_tokens)
    kind = ("disconnect" if hang_up else ("stream" if stream else "json")) + ("+audio" if clip else "")
    t0 = time.perf_counter()
    if rng.random() < 0.5:
        url = server.url + "/v1/chat/completions"
        content = [{"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}},
                   {"type": "text", "text": f"what is in picture {i}?"}]
        if clip is not None:
            content.insert(1, {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip[0]).decode(),
                                                                      "format": clip[1]}})
        request = client.build_request("POST", url, json={"model": server.model, "max_tokens": max_tokens,
                                                          "stream": stream, "messages": [{"role": "user",
                                                                                          "content": content}]})
    else:
        request = client.build_request("POST", server.url + "/v1/generate",
                                       data={"prompt": f"what is in picture {i}?", "max_tokens": str(max_tokens),
                                             "stream": "true" if stream else "false"},
                                       files=[("image", (f"{i}.img", data, mime)),
                                              *([("audio", (f"{i}.{clip[1]}", clip[0], "audio/" + clip[1]))]
                                                if clip is not None else [])])
    response = await client.send(request, stream=True)
    try:
        if hang_up and response.status_code == 200:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break  # hang up after the first chunk
        else:
            body = await response.aread()
            if response.status_code == 200 and stream and not body.rstrip().endswith(b"data: [DONE]"):
                return Outcome(i, 599, time.perf_counter() - t0, kind)  # a stream that did not finish properly
    finally:
        await response.aclose()
    return Outcome(i, response.status_code, time.perf_counter() - t0, kind)


async def drive(run: Run) -> None:
    args = run.args
    rng = random.Random(args.seed)
    next_index = 0
    deadline = run.started + args.duration
    recent: list[tuple[bytes, str]] = []
    recent_clips: list[tuple[bytes, str]] = []
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < args.requests and time.monotonic() < deadline:
                i = next_index
                next_index += 1
                try:
                    outcome = await one_request(client, run, i, random.Random(rng.random()), recent, recent_clips)
                except httpx.HTTPError as e:
                    log.warning("request %d: %s", i, e)
                    outcome = Outcome(i, 0, 0.0, "transport-error")
                run.outcomes.append(outcome)
                run.window.append(outcome)
                if len(run.outcomes) % args.sample_every == 0:
                    run.sample()

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    if run.window:
        run.sample()


def summarize(run: Run) -> dict[str, Any]:
    samples = [s for s in run.samples if s["rss_mb"] is not None]
    statuses = Counter(o.status for o in run.outcomes)
    ok = sorted(o.latency for o in run.outcomes if o.status == 200 and not o.kind.startswith("disconnect"))
    summary: dict[str, Any] = {
        "requests": len(run.outcomes), "duration_s": round(time.monotonic() - run.started, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "kinds": dict(Counter(o.kind for o in run.outcomes)),
        "latency_ms": {"p50": percentile_ms(ok, 0.5), "p95": percentile_ms(ok, 0.95), "max": percentile_ms(ok, 1.0)},
    }
    if samples:
        warm = next((s for s in samples if s["requests"] >= run.args.warmup), samples[0])
        mid = samples[len(samples) // 2] if len(samples) > 2 else warm
        end = samples[-1]
        second_half = end["rss_mb"] - mid["rss_mb"]
        tolerance = max(16.0, 0.02 * mid["rss_mb"])
        summary["rss_mb"] = {"start": samples[0]["rss_mb"], "after_warmup": warm["rss_mb"],
                             "middle": mid["rss_mb"], "end": end["rss_mb"],
                             "max": max(s["rss_mb"] for s in samples),
                             "growth_after_warmup": round(end["rss_mb"] - warm["rss_mb"], 1),
                             "growth_second_half": round(second_half, 1), "tolerance": round(tolerance, 1)}
        summary["fds"] = {"after_warmup": warm["fds"], "end": end["fds"], "max": max(s["fds"] for s in samples)}
        summary["threads"] = {"after_warmup": warm["threads"], "end": end["threads"]}
        summary["leveled_off"] = second_half <= tolerance
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (else one is started here)")
    parser.add_argument("--pid", type=int, help="pid of the --url server, for its RSS")
    parser.add_argument("--model", help="checkpoint to serve (default: the tiny test checkpoint, built here)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `vlmserve serve` argument")
    parser.add_argument("--vision-cache-mb", type=int, default=1, help="for the server started here (see above)")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=240.0, help="seconds; the run stops at the first limit")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sample-every", type=int, default=250)
    parser.add_argument("--warmup", type=int, default=1000, help="requests before the 'after warm-up' RSS sample")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--stream-rate", type=float, default=0.5)
    parser.add_argument("--disconnect-rate", type=float, default=0.2, help="share of streams that hang up")
    parser.add_argument("--repeat-rate", type=float, default=0.1, help="share of requests that repeat an image")
    parser.add_argument("--audio-rate", type=float, default=0.0, help="share of requests that carry a clip too")
    parser.add_argument("--max-clip-seconds", type=float, default=4.5, help="longest clip (within the window)")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        if args.url:
            model = httpx.get(args.url + "/v1/models", timeout=10).json()["data"][0]["id"]
            server = Server(args.url.rstrip("/"), model, args.pid)
        else:
            model_dir = Path(args.model) if args.model else tiny_checkpoint(work, audio=args.audio_rate > 0)
            server = start_server(model_dir, work, ["--vision-cache-mb", str(args.vision_cache_mb), *args.server_arg])
        run = Run(args, server)
        start = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in sample_process(server.pid).items()}
        log.info("soak against %s (%s), pid %s, RSS at start %s MB", server.url, server.model, server.pid,
                 start["rss_mb"])
        exit_code, alive = None, False
        try:
            run.samples.append({"requests": 0, "t_s": 0.0, **start, "p50_ms": None, "p95_ms": None, "statuses": {}})
            asyncio.run(drive(run))
            alive = httpx.get(server.url + "/health", timeout=10).status_code == 200
        finally:
            if server.process is not None:
                exit_code = server.stop()
        summary = summarize(run)
        summary["server_alive_at_end"] = alive
        summary["server_exit_code"] = exit_code
    result = {"benchmark": "soak", "server": server.url, "model": server.model,
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "summary": summary, "curve": run.samples}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.write(json.dumps(result) + "\n")
    bad = {k: v for k, v in summary["statuses"].items() if k not in ("200",)}
    log.info("done: %d requests in %.0f s, statuses %s, RSS %s -> %s MB (max %s), leveled off: %s",
             summary["requests"], summary["duration_s"], summary["statuses"], summary.get("rss_mb", {}).get("start"),
             summary.get("rss_mb", {}).get("end"), summary.get("rss_mb", {}).get("max"), summary.get("leveled_off"))
    return 0 if not bad and alive and summary.get("leveled_off", True) else 1


if __name__ == "__main__":
    sys.exit(main())
