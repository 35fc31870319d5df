"""Scale-out on Ray Serve, for real: one local Ray (`ray.init(num_cpus=2)`) shared by every test here, the tiny
checkpoint, real HTTP through Serve's proxy, the real `openai` client.

`vlmserve serve --replicas 2 --ray-address ADDR` joins that cluster (image affinity, the API's shapes, streaming,
cancellation, per-replica metrics, SIGKILL of a replica under load, SIGTERM); then `serve run` with the YAML of
deploy/ray/serve.yaml (the test's copy points it at the tiny checkpoint, shrinks Ray's delays) scales from 1 to 2
replicas under load and back.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from live_server import LiveServer, free_port, wait_until_ready
from PIL import Image

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)
FAST = ["--health-check-period-s", "1", "--replica-cpus", "0.4", "--ingress-cpus", "0.1", "--max-running", "4",
        "--max-waiting", "32", "--drain-timeout", "5"]


def png(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_chat(url: str, model: str, image: str, **extra: Any) -> httpx.Response:
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "what color is it"}]
    body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def running_replicas(app: str) -> int:
    status = serve.status().applications.get(app)
    if status is None or "EngineReplica" not in status.deployments:
        return 0
    return int(status.deployments["EngineReplica"].replica_states.get("RUNNING", 0))


def engine_pids(app: str) -> list[int]:
    """Process ids of the engine replicas of `app` (Ray titles each replica's process with its deployment)."""
    title = f"ray::ServeReplica:{app}:EngineReplica".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(title):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, int]]:
    """One local Ray for the module (2 CPUs) with Serve's proxy on a free port, on the data path that `vlmserve serve
    --replicas` gives its own local Ray (server/scale/fast_path.py): (the address that `--ray-address` and `serve
    run` join, the port)."""
    from vlmserve.server.scale.fast_path import fast_path_env

    port = free_port()
    saved = dict(os.environ)
    os.environ.update(fast_path_env())  # as `vlmserve serve --replicas` starts its local Ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="vlmserve-tests")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield ray.get_runtime_context().gcs_address, port
    finally:
        ray.shutdown()  # the whole local cluster, Serve's controller and proxy with it
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def autoscaled(cluster: tuple[str, int], clip_llama: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[LiveServer]:
    """`serve run` of deploy/ray/serve.yaml (a copy: the tiny checkpoint, autoscaling between 1 and 2 replicas,
    Ray's delays shrunk), as the application `auto` under /auto, started beside the 2-replica one (not waited for
    here: the two load at once)."""
    address, port = cluster
    config = yaml.safe_load((ROOT / "deploy/ray/serve.yaml").read_text())
    app = config["applications"][0]
    app.update(name="auto", route_prefix="/auto")
    app["args"].update(model=str(clip_llama), served_model_name="tiny-llava", replicas=1, min_replicas=1,
                       max_replicas=2, target_ongoing_requests=1, upscale_delay_s=1, downscale_delay_s=2,
                       health_check_period_s=1, replica_cpus=0.4, replica_gpus=0, ingress_cpus=0.1, max_running=2)
    config["http_options"].update(host="127.0.0.1", port=port)
    folder = tmp_path_factory.mktemp("serve-run")
    (folder / "serve.yaml").write_text(yaml.safe_dump(config))
    log_path = folder / "serve-run.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen([str(Path(sys.executable).with_name("serve")), "run", "--address", address,
                                    str(folder / "serve.yaml")], stdout=out, stderr=subprocess.STDOUT)
    yield LiveServer(f"http://127.0.0.1:{port}/auto", process, log_path, "tiny-llava")
    process.terminate()  # Serve and the cluster go with the `cluster` fixture's ray.shutdown()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)



def preprocess_counts(url: str) -> dict[str, float]:
    """Images preprocessed so far, by replica rank ("ingress": the ingress's own), from the ingress's /metrics."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("vlmserve:image_preprocess_seconds_count"):
            name, value = line.rsplit(" ", 1)
            rank = name.split('replica="')[1].split('"')[0] if 'replica="' in name else "ingress"
            out[rank] = out.get(rank, 0) + float(value)
    return out

class TestTwoReplicas:
    @pytest.fixture(scope="class")
    def server(self, cluster: tuple[str, int], autoscaled: LiveServer, clip_llama: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
        address, http_port = cluster
        log_path = tmp_path_factory.mktemp("ray") / "serve.log"
        cmd = [sys.executable, "-m", "vlmserve.server.cli", "serve", "--model", str(clip_llama), "--port",
               str(http_port), "--served-model-name", "tiny-llava", "--replicas", "2", "--ray-address", address,
               *FAST]
        with open(log_path, "wb") as out:
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
        server = LiveServer(f"http://127.0.0.1:{http_port}", process, log_path, "tiny-llava")
        wait_until_ready(server, timeout=180)
        yield server
        code = server.stop(signal.SIGTERM, timeout=60)
        assert code == 0, server.log()[-3000:]

    def test_ready_means_every_replica_is_up(self, server: LiveServer) -> None:
        assert httpx.get(server.url + "/ready").status_code == 200
        assert running_replicas("vlmserve") == 2

    def test_repeats_of_an_image_land_on_one_replica_and_both_serve(self, server: LiveServer) -> None:
        colors = [(40 * i, 255 - 30 * i, (90 * i) % 256) for i in range(8)]
        seen: dict[int, set[str]] = {}
        cached: list[int] = []
        before = preprocess_counts(server.url)
        for i, color in enumerate(colors):
            image = png(color)
            for repeat in range(3):
                r = image_chat(server.url, server.model_id, image)
                assert r.status_code == 200, r.text
                seen.setdefault(i, set()).add(r.headers["x-vlmserve-replica"])
                if repeat:
                    cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert all(len(ranks) == 1 for ranks in seen.values()), seen
        assert set().union(*seen.values()) == {"0", "1"}, seen
        assert all(n > 0 for n in cached), cached  # each repeat met its replica's prefix cache
        # the ingress only checks images; each was prepared once, by its replica (a repeat: no pixel work at all)
        deadline, after = time.monotonic() + 15, before
        while time.monotonic() < deadline:
            after = preprocess_counts(server.url)
            if sum(after.values()) - sum(before.values()) >= 8:
                break
            time.sleep(0.5)
        grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        assert sum(grew.values()) == 8 and not grew.get("ingress"), grew

    def test_openai_client_streams_and_errors_keep_their_shapes(self, server: LiveServer) -> None:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        with client.chat.completions.with_streaming_response.create(
                model=server.model_id, max_tokens=6, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},  # sampled: the random model may otherwise end before 6 tokens
                messages=[{"role": "user", "content": "describe the image"}]) as raw:
            assert raw.headers["x-vlmserve-replica"] in ("0", "1")
            chunks = list(raw.parse())
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        full = client.chat.completions.create(model=server.model_id, max_tokens=6, temperature=0,
                                              messages=[{"role": "user", "content": "describe the image"}])
        assert full.choices[0].message.content is not None and full.usage is not None
        assert len(text) > 0
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
        too_long = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
            "model": server.model_id, "max_tokens": 100_000, "messages": [{"role": "user", "content": "hi"}]})
        assert too_long.status_code == 400
        assert too_long.json()["error"]["code"] == "context_length_exceeded"
        bad = httpx.post(server.url + "/v1/chat/completions", json={"model": server.model_id, "messages": []})
        assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
        # a truncated image is refused by the ingress (which checks every image) before anything streams
        cut = base64.b64encode(base64.b64decode(png((9, 8, 7)).split(",")[1])[:60]).decode()
        broken = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
            "model": server.model_id, "stream": True, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + cut}},
                {"type": "text", "text": "what is it"}]}]})
        assert broken.status_code == 400, broken.text
        assert broken.json()["error"]["param"].startswith("messages"), broken.json()
        form = httpx.post(server.url + "/v1/generate", data={"prompt": "hi", "max_tokens": "3", "stream": "true",
                                                             "temperature": "0"},  # greedy: no early EOS by chance
                          files={"image": ("a.png", base64.b64decode(png((1, 2, 3)).split(",")[1]), "image/png")})
        events = [line for line in form.text.splitlines() if line.startswith("data: ")]
        assert form.status_code == 200 and events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 3

    def test_cancelled_stream_is_cancelled_in_its_replica_and_metrics_are_per_replica(self, server: LiveServer
                                                                                       ) -> None:
        body = {"model": server.model_id, "max_tokens": 200, "stream": True, "ignore_eos": True,
                "messages": [{"role": "user", "content": "count"}]}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
            rank = r.headers["x-vlmserve-replica"]
            next(r.iter_lines())  # one chunk, then hang up
        deadline = time.monotonic() + 20
        line = f'vlmserve:request_cancelled_total{{replica="{rank}"}} 1.0'
        while time.monotonic() < deadline:
            text = httpx.get(server.url + "/metrics").text
            if line in text:
                break
            time.sleep(0.5)
        assert line in text, [t for t in text.splitlines() if "cancelled" in t]
        for r in ("0", "1"):
            assert f'vlmserve:generation_tokens_total{{replica="{r}"}}' in text
        assert 'vlmserve:http_requests_total{route="/v1/chat/completions",status="200"}' in text

    def test_sigkill_of_a_replica_under_load(self, server: LiveServer) -> None:
        images = [png((7 * i, 3 * i, 200)) for i in range(8)]
        victim = engine_pids("vlmserve")[0]
        killed_at: list[float] = []
        results: list[tuple[float, int, str]] = []  # (start, status, problem or "")
        stop = threading.Event()

        def load(worker: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                start = time.monotonic()
                stream = n % 2 == 0
                try:
                    r = image_chat(server.url, server.model_id, images[(worker + n) % 8], stream=stream,
                                   max_tokens=8)
                    problem = "error event" if stream and '"error"' in r.text else ""
                    results.append((start, r.status_code, problem))
                except httpx.HTTPError as e:
                    results.append((start, -1, repr(e)))

        with ThreadPoolExecutor(6) as pool:
            for w in range(6):
                pool.submit(load, w)
            time.sleep(2)
            os.kill(victim, signal.SIGKILL)
            killed_at.append(time.monotonic())
            time.sleep(4)
            stop.set()
        assert all(status in (200, 503) and "HTTPError" not in problem for _, status, problem in results), results
        later = [(status, problem) for start, status, problem in results if start > killed_at[0] + 1]
        assert later and all(status == 200 and not problem for status, problem in later), later
        deadline = time.monotonic() + 90
        while running_replicas("vlmserve") < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert running_replicas("vlmserve") == 2
        assert victim not in engine_pids("vlmserve")
        ranks = {image_chat(server.url, server.model_id, image).headers["x-vlmserve-replica"] for image in images}
        assert ranks == {"0", "1"}  # the replacement took over the dead replica's rank


def test_serve_run_yaml_autoscales_on_queue_depth(autoscaled: LiveServer) -> None:
    server, app = autoscaled, "auto"
    t0 = time.monotonic()
    wait_until_ready(server, timeout=180)
    log.info("serve run: ready %.1f s later", time.monotonic() - t0)
    assert running_replicas(app) == 1
    stop = threading.Event()

    def load() -> None:  # two long generations at a time: twice the target, one core left for a new replica
        while not stop.is_set():
            image_chat(server.url, "tiny-llava", png((5, 5, 5)), max_tokens=150, ignore_eos=True)

    with ThreadPoolExecutor(2) as pool:
        for _ in range(2):
            pool.submit(load)
        t0 = time.monotonic()
        while running_replicas(app) < 2 and time.monotonic() - t0 < 60:
            time.sleep(0.5)
        up = time.monotonic() - t0
        stop.set()
    assert running_replicas(app) == 2, f"not 2 replicas {up:.0f} s into the load"
    t0 = time.monotonic()
    while running_replicas(app) > 1 and time.monotonic() - t0 < 120:
        time.sleep(0.5)
    log.info("autoscaling: 1 -> 2 replicas in %.1f s of load, back to 1 in %.1f s", up, time.monotonic() - t0)
    assert running_replicas(app) == 1, "not back to 1 replica 120 s after the load"
