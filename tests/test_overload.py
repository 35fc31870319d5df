"""Overload, disconnects and faults against real server processes.

- A burst far past the queue limit gets only 200s and fast 429s with Retry-After; the waiting gauge never passes
  its limit; the surplus is refused before any image is decoded.
- Clients that hang up mid-stream free their slots at once and do not slow the others; slow clients block no one.
- A fault inside one request fails that request alone (500 in the error shape); a dead engine loop turns /ready to
  503 and makes the process exit non-zero; SIGTERM lets in-flight streams finish and exits 0.

Faults are injected by a small launcher (below) that monkeypatches the server's own classes before calling
`vlmserve.server.cli.main`: the production code has no test hooks. The same launcher slows each decode step by
`FAULT_STEP_DELAY` seconds so that a stream lasts long enough to be abandoned, queued behind or drained, and can hold
the exit after an engine death for `FAULT_FATAL_DELAY` seconds so that the 503 of /ready is surely observed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hostile_images as images
import httpx
import pytest
from live_server import LiveServer, free_port, wait_until_ready

MODEL = "tiny-llava"
ERROR_KEYS = {"message", "type", "param", "code"}
MARKER = b"FAULT-INJECTION-MARKER"  # image bytes carrying it make RequestPreparer.image raise
ACCEPT_FAULT_MAX_TOKENS = 171  # a request with this max_tokens raises inside the engine, in its own token handling
LOOP_FAULT_MAX_TOKENS = 173  # a request with this max_tokens kills the engine loop (outside any per-request guard)

LAUNCHER = f"""
import os, sys, time
from vlmserve.server.engine import core, output_processor, prepare

original_image = prepare.RequestPreparer.image
def image(self, data, digest=None, plan=None):
    if {MARKER!r} in data:
        raise RuntimeError("injected fault in image preparation")
    return original_image(self, data, digest, plan)
prepare.RequestPreparer.image = image

original_accept = output_processor.OutputProcessor.accept
def accept(self, seq, token, now, events, logprob=None):
    if seq.max_tokens == {ACCEPT_FAULT_MAX_TOKENS}:
        raise RuntimeError("injected fault while streaming one request")
    return original_accept(self, seq, token, now, events, logprob)
output_processor.OutputProcessor.accept = accept

delay = float(os.environ.get("FAULT_STEP_DELAY", "0"))
original_step = core.EngineCore.step
def step(self):
    if any(s.max_tokens == {LOOP_FAULT_MAX_TOKENS} for s in self.scheduler.running):
        raise RuntimeError("injected engine loop death")
    if delay:
        time.sleep(delay)
    return original_step(self)
core.EngineCore.step = step

fatal_delay = float(os.environ.get("FAULT_FATAL_DELAY", "0"))
if fatal_delay:  # hold the exit a moment after the engine dies, so that a poller surely sees /ready answer 503
    import threading
    from vlmserve.server import api
    original_watch = api._watch_engine
    async def watch(state):
        fatal = state.on_fatal
        state.on_fatal = lambda: threading.Timer(fatal_delay, fatal).start()
        await original_watch(state)
    api._watch_engine = watch

from vlmserve.server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def launch(model_dir: Path, log_dir: Path, *args: str, step_delay: float = 0.0, fatal_delay: float = 0.0) -> LiveServer:
    """`vlmserve serve` through the fault-injecting launcher, on a free port (not waited for)."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-c", LAUNCHER, "serve", "--model", str(model_dir), "--port", str(port),
           "--served-model-name", MODEL, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FAULT_STEP_DELAY": str(step_delay),
           "FAULT_FATAL_DELAY": str(fatal_delay)}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return LiveServer(f"http://127.0.0.1:{port}", process, log_path, MODEL)


@pytest.fixture(scope="module")
def servers(checkpoint_factory: Callable[[str], Path],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LiveServer]]:
    """Three servers started together: `burst` (1 slot, 2 waiting, 2 s to send a body, 1 MiB of bodies at once),
    `faulty` (8 slots), `doomed` (its loop dies)."""
    model, logs = checkpoint_factory("clip-llama"), tmp_path_factory.mktemp("overload")
    started = {
        "burst": launch(model, logs, "--max-running", "1", "--max-waiting", "2", "--body-timeout", "2",
                        "--max-body-bytes", "600000", "--max-body-buffer-mb", "1", step_delay=0.005),
        "faulty": launch(model, logs, "--max-running", "8", "--max-waiting", "32", step_delay=0.01),
        "doomed": launch(model, logs, "--max-running", "2", "--max-waiting", "4", fatal_delay=1.0),
    }
    try:
        for server in started.values():
            wait_until_ready(server, timeout=120)
        yield started
    finally:
        for server in started.values():
            server.stop(signal.SIGKILL)


# ------------------------------------------------------------------------------------------------------- helpers
def png_bytes(seed: int, side: int = 48) -> bytes:
    return images.png(side, side, seed=seed)


def chat_body(image: bytes | None = None, **fields: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": "describe"}]
    if image is not None:
        url = f"data:image/png;base64,{base64.b64encode(image).decode()}"
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": content}], **fields}


def metric(server: LiveServer, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS
    return error


def poll(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


async def gauge_watch(client: httpx.AsyncClient, server: LiveServer, stop: asyncio.Event,
                      seen: dict[str, list[float]]) -> None:
    """Poll the queue gauges until `stop` is set."""
    names = ("vlmserve:num_requests_waiting", "vlmserve:num_requests_running")
    while not stop.is_set():
        text = (await client.get(server.url + "/metrics")).text
        for name in names:
            match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
            if match:
                seen.setdefault(name, []).append(float(match.group(1)))
        await asyncio.sleep(0.01)


async def timed_post(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    response = await client.post(url, json=body)
    return response, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------------- overload
def test_burst_gets_200s_and_fast_429s(servers: dict[str, LiveServer]) -> None:
    server = servers["burst"]
    n = 40
    preprocessed = metric(server, "vlmserve:image_preprocess_seconds_count")

    async def burst() -> tuple[list[tuple[httpx.Response, float]], dict[str, list[float]]]:
        limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            stop, seen = asyncio.Event(), {}
            watcher = asyncio.ensure_future(gauge_watch(client, server, stop, seen))
            await asyncio.sleep(0.05)
            bodies = [chat_body(png_bytes(1000 + i), max_tokens=20) for i in range(n)]
            results = await asyncio.gather(*(timed_post(client, server.url + "/v1/chat/completions", b)
                                             for b in bodies))
            stop.set()
            await watcher
            return results, seen

    results, seen = asyncio.run(burst())
    statuses = Counter(r.status_code for r, _ in results)
    refusals = [elapsed for r, elapsed in results if r.status_code != 200]
    print(f"burst of {n}: statuses {dict(statuses)}, slowest refusal {max(refusals, default=0) * 1000:.0f} ms, "
          f"max waiting gauge {max(seen.get('vlmserve:num_requests_waiting', [0])):.0f}")
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses[200] >= 1 and statuses[429] >= n // 2, statuses
    slowest_refusal = 0.0
    for response, elapsed in results:
        if response.status_code == 200:
            assert response.json()["usage"]["completion_tokens"] >= 1
            continue
        error = error_of(response, response.status_code)
        assert error["code"] in ("queue_full", "unavailable") and int(response.headers["retry-after"]) >= 1
        slowest_refusal = max(slowest_refusal, elapsed)
    assert slowest_refusal < 1.0, f"a refusal took {slowest_refusal:.2f}s"
    assert seen["vlmserve:num_requests_waiting"] and max(seen["vlmserve:num_requests_waiting"]) <= 2, seen
    assert max(seen["vlmserve:num_requests_running"]) <= 1
    # refused before decoding: only the admitted requests' images were decoded (all images distinct)
    decoded = metric(server, "vlmserve:image_preprocess_seconds_count") - preprocessed
    assert decoded <= statuses[200] < n, (decoded, statuses)
    assert httpx.get(server.url + "/ready").status_code == 200


def test_refusal_comes_before_decoding_a_huge_image(servers: dict[str, LiveServer]) -> None:
    """While the queue is full, a 36-megapixel image is refused at once, without being decoded; once the server
    is free the same image is decoded and answered (and that takes visibly longer)."""
    server = servers["burst"]
    huge = images.png_bomb(6000, 6000)  # 36 M pixels in ~30 KB: slow to decode, legal under the cap
    url = server.url + "/v1/chat/completions"

    async def saturated() -> tuple[httpx.Response, float, float]:
        async with httpx.AsyncClient(timeout=60) as client:
            long = chat_body(max_tokens=120, stream=True, ignore_eos=True)  # 120 steps of >= 5 ms: stays busy
            holders = [asyncio.ensure_future(client.post(url, json=long)) for _ in range(3)]
            ok = await asyncio.to_thread(poll, lambda: metric(server, "vlmserve:num_requests_waiting") >= 2, 10, 0.01)
            assert ok, "the queue never filled"
            before = await asyncio.to_thread(metric, server, "vlmserve:image_preprocess_seconds_count")
            response, elapsed = await timed_post(client, url, chat_body(huge, max_tokens=2))
            after = await asyncio.to_thread(metric, server, "vlmserve:image_preprocess_seconds_count")
            for holder in holders:
                assert (await holder).status_code == 200
            return response, elapsed, after - before

    refused, refused_in, decoded = asyncio.run(saturated())
    error = error_of(refused, 429)
    assert error["code"] == "queue_full" and refused.headers["retry-after"]
    assert decoded == 0, "the refused image was decoded"
    assert poll(lambda: metric(server, "vlmserve:num_requests_running") == 0, 10)
    t0 = time.perf_counter()
    accepted = httpx.post(url, json=chat_body(huge, max_tokens=2), timeout=60)
    accepted_in = time.perf_counter() - t0
    assert accepted.status_code == 200, accepted.text
    print(f"36 MP image: refused in {refused_in * 1000:.0f} ms while full, answered in {accepted_in * 1000:.0f} ms "
          "when free")
    assert refused_in < 1.0 and refused_in < accepted_in


# ---------------------------------------------------------------------------------------------------- disconnects
def test_hung_up_streams_free_their_slots(servers: dict[str, LiveServer]) -> None:
    """24 clients hang up after their first chunk of a 200-token stream (about 2 s each if left running, queued
    three deep for 8 slots): slots come back, the cancel counter grows, and a normal request is not held up."""
    server = servers["faulty"]
    url = server.url + "/v1/chat/completions"
    n = 24
    cancelled = metric(server, "vlmserve:request_cancelled_total")
    normal_body = chat_body(png_bytes(7), max_tokens=10)
    t0 = time.perf_counter()
    httpx.post(url, json=normal_body, timeout=60).raise_for_status()
    alone = time.perf_counter() - t0

    async def abandon(client: httpx.AsyncClient, i: int) -> bool:
        body = chat_body(png_bytes(2000 + i), max_tokens=200, stream=True, temperature=1.0, seed=i, ignore_eos=True)
        async with client.stream("POST", url, json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and '"content":""' not in line:
                    return True  # hang up: the connection is closed without reading the rest
        return False

    async def run() -> tuple[list[bool], float, dict[str, list[float]]]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            stop, seen = asyncio.Event(), {}
            watcher = asyncio.ensure_future(gauge_watch(client, server, stop, seen))
            abandoned = [asyncio.ensure_future(abandon(client, i)) for i in range(n)]
            await asyncio.sleep(0.2)  # the abandoning streams take the slots first
            _, elapsed = await timed_post(client, url, normal_body)
            hung_up = await asyncio.gather(*abandoned)
            stop.set()
            await watcher
            return hung_up, elapsed, seen

    hung_up, with_crowd, seen = asyncio.run(run())
    assert all(hung_up)
    assert max(seen["vlmserve:num_requests_running"]) >= 4  # they did run concurrently
    assert poll(lambda: metric(server, "vlmserve:num_requests_running") == 0
                and metric(server, "vlmserve:num_requests_waiting") == 0, 10), "slots not freed"
    grown = metric(server, "vlmserve:request_cancelled_total") - cancelled
    print(f"{n} hung-up streams: {grown:.0f} cancelled; a normal request took {alone:.2f}s alone, "
          f"{with_crowd:.2f}s among them")
    assert grown == n  # no stream can end by itself first: EOS is ignored and 200 tokens take far longer
    assert with_crowd < max(3 * alone, 2.0), "the abandoned streams held up a normal request"


def _partial_upload(server: LiveServer, declared: int, sent: bytes) -> socket.socket:
    """A connection that declares a `declared`-byte body, sends `sent` of it and stalls."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % declared + sent)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Status, headers and JSON body of the answer on `sock` (our error answers close the connection)."""
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_slow_clients_do_not_block_others(servers: dict[str, LiveServer]) -> None:
    """Ten clients trickle their request bodies a few bytes at a time; a normal request goes through meanwhile."""
    server = servers["faulty"]
    sockets = []
    try:
        for _ in range(10):
            sockets.append(_partial_upload(server, 100_000, b'{"messages": ['))
        for _ in range(3):
            for sock in sockets:
                sock.sendall(b" ")
            t0 = time.perf_counter()
            r = httpx.post(server.url + "/v1/chat/completions", json=chat_body(max_tokens=4), timeout=30)
            assert r.status_code == 200 and time.perf_counter() - t0 < 3
    finally:
        for sock in sockets:
            sock.close()
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_body_that_never_arrives_gets_408(servers: dict[str, LiveServer]) -> None:
    """A client that stops sending its body is answered 408 after --body-timeout (2 s here), not waited for."""
    server = servers["burst"]
    sock = _partial_upload(server, 1000, b'{"messages": [')
    try:
        t0 = time.perf_counter()
        status, _, body = _read_response(sock)
        waited = time.perf_counter() - t0
    finally:
        sock.close()
    assert status == 408 and body["error"]["code"] == "request_timeout" and "2 seconds" in body["error"]["message"]
    assert 1.5 < waited < 10
    assert httpx.post(server.url + "/v1/chat/completions", json=chat_body(), timeout=30).status_code == 200


def test_bodies_held_at_once_are_bounded(servers: dict[str, LiveServer]) -> None:
    """Two stalled 450 KB uploads hold most of the 1 MiB budget for bodies: a third large body gets a fast 503 with
    Retry-After; once the stalled ones time out (408), the same body goes through."""
    server = servers["burst"]
    big = (json.dumps(chat_body()) + " " * 300_000).encode()  # valid JSON, 300 KB (under the 600 KB cap)
    stalled = [_partial_upload(server, 500_000, b" " * 450_000) for _ in range(2)]
    try:
        time.sleep(0.5)  # the server has read what was sent
        t0 = time.perf_counter()
        refused = httpx.post(server.url + "/v1/chat/completions", content=big,
                             headers={"content-type": "application/json"}, timeout=30)
        assert time.perf_counter() - t0 < 1.5
        error = error_of(refused, 503)
        assert error["code"] == "server_busy" and refused.headers["retry-after"] == "1"
        assert [_read_response(sock)[0] for sock in stalled] == [408, 408]  # the stalled uploads time out
    finally:
        for sock in stalled:
            sock.close()
    ok = httpx.post(server.url + "/v1/chat/completions", content=big, headers={"content-type": "application/json"},
                    timeout=30)
    assert ok.status_code == 200, ok.text


# --------------------------------------------------------------------------------------------------------- faults
def test_fault_in_one_request_fails_only_that_request(servers: dict[str, LiveServer]) -> None:
    server = servers["faulty"]
    url = server.url + "/v1/chat/completions"
    poisoned = png_bytes(3) + MARKER  # trailing bytes after IEND: a valid PNG that trips the injected fault

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            bodies = [chat_body(poisoned), chat_body(max_tokens=ACCEPT_FAULT_MAX_TOKENS)]
            bodies += [chat_body(png_bytes(3000 + i), max_tokens=8) for i in range(6)]
            return await asyncio.gather(*(client.post(url, json=b) for b in bodies))

    results = asyncio.run(run())
    for response in results[:2]:  # the image-preparation fault, then the engine's per-request fault
        error = error_of(response, 500)
        assert error["type"] == "server_error" and error["code"] == "internal_error"
    for response in results[2:]:
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 1
    # streamed: the failure arrives as an error event, then [DONE]
    with httpx.stream("POST", url, json=chat_body(max_tokens=ACCEPT_FAULT_MAX_TOKENS, stream=True)) as r:
        payloads = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and payloads[-1] == "[DONE]" and '"internal_error"' in payloads[-2]
    assert httpx.get(server.url + "/ready").status_code == 200
    assert server.process.poll() is None
    log = server.log()
    assert "injected fault in image preparation" in log and "injected fault while streaming" in log


def test_engine_loop_death_turns_ready_503_and_exits_nonzero(servers: dict[str, LiveServer]) -> None:
    server = servers["doomed"]
    assert httpx.get(server.url + "/ready").status_code == 200
    ready: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        with httpx.Client(timeout=2) as client:
            while not stop.is_set():
                try:
                    ready.append(client.get(server.url + "/ready").status_code)
                except httpx.TransportError:
                    ready.append(0)  # the process is gone
                time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        t0 = time.monotonic()
        r = httpx.post(server.url + "/v1/chat/completions", json=chat_body(max_tokens=LOOP_FAULT_MAX_TOKENS),
                       timeout=30)
        error_of(r, 503)
        code = server.process.wait(timeout=15)
        exited_in = time.monotonic() - t0
    finally:
        stop.set()
        watcher.join()
    print(f"engine loop died: exit code {code} after {exited_in:.1f}s (1 s of it the launcher's hold); "
          f"/ready answers seen {dict(Counter(ready))}")
    assert code != 0 and exited_in < 10
    assert 503 in ready, "/ready never said 503"
    assert "injected engine loop death" in server.log()


def test_sigterm_drains_an_in_flight_stream_and_exits_0(servers: dict[str, LiveServer]) -> None:
    """Last in the module: it stops the `faulty` server."""
    server = servers["faulty"]
    body = chat_body(png_bytes(9), max_tokens=150, stream=True, stream_options={"include_usage": True},
                     temperature=1.0, seed=5, ignore_eos=True)  # EOS would end the stream early
    events: list[str] = []
    first = threading.Event()

    def consume() -> None:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert first.wait(30)
    server.process.send_signal(signal.SIGTERM)
    signalled_at = len(events)
    try:
        late = httpx.post(server.url + "/v1/chat/completions", json=chat_body(), timeout=5)
        assert late.status_code == 503 and late.headers["retry-after"]
    except httpx.TransportError:
        pass  # the listening socket is already closed
    reader.join(60)
    assert events[-1] == "[DONE]" and '"error"' not in "".join(events)
    assert len(events) > signalled_at + 1, "nothing was streamed after the signal"
    assert server.process.wait(30) == 0
