"""Shared fixtures: tiny random LLaVA checkpoints, built once per test session, nothing downloaded."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Servers started by tests decode eagerly (compiling costs seconds per server); the compiled step has its own
# tests (tests/test_engine.py), which ask for it.
os.environ.setdefault("VLMSERVE_COMPILE", "false")
# OpenMP's threads wait passively (training/cli.py sets the same, but only for a process that imports it before
# torch): a test process that trains in-process while servers or other jobs hold the CPU spins itself to a
# crawl otherwise (tests/test_training.py's smoke run: 71 s against 5 s on a loaded two-core machine).
# Read when torch loads OpenMP, so before anything below imports torch; servers started by tests inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import SPECS, build_checkpoint

# Property tests draw the same examples on every run (a red CI run replays anywhere); VLMSERVE_HYPOTHESIS=explore
# draws new ones each run, as a fuzzing session would.
settings.register_profile("repeatable", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile(os.environ.get("VLMSERVE_HYPOTHESIS", "repeatable"))


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory):
    """Build (once) and return the directory of the tiny checkpoint named in tests/checkpoints.py's SPECS."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_checkpoint(SPECS[name], tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(scope="session", params=sorted(SPECS))
def tiny_checkpoint(request: pytest.FixtureRequest, checkpoint_factory) -> Path:
    """Each tiny checkpoint in turn: CLIP + Llama (llama3 rope), SigLIP + Qwen2 (full, tied), CLIP multi-layer."""
    return checkpoint_factory(request.param)


@pytest.fixture(scope="session")
def clip_llama(checkpoint_factory) -> Path:
    return checkpoint_factory("clip-llama")


@pytest.fixture(scope="session")
def live_server(checkpoint_factory, tmp_path_factory: pytest.TempPathFactory):
    """The real server over HTTP on a free port, serving the tiny CLIP + Llama checkpoint as `tiny-llava`."""
    from live_server import start_server

    server = start_server(checkpoint_factory("clip-llama"), tmp_path_factory.mktemp("logs"),
                          "--served-model-name", "tiny-llava", "--max-running", "8", "--max-waiting", "32")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def default_server(tmp_path_factory: pytest.TempPathFactory):
    """`vlmserve serve` with no --model: the embedded SHAPES model, over HTTP on a free port."""
    import subprocess

    from live_server import LiveServer, free_port, wait_until_ready

    port = free_port()
    log_path = tmp_path_factory.mktemp("default-server") / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "vlmserve.server.cli", "serve", "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    server = LiveServer(f"http://127.0.0.1:{port}", process, log_path, "shapes-llava")
    wait_until_ready(server, timeout=120)
    yield server
    server.stop()
