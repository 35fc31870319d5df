"""Start the real server (`vlmserve serve`, uvicorn, a free port) in a subprocess and wait until it is ready."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    model_id: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def start_server(model_dir: Path, log_dir: Path, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 90, wait_ready: bool = True) -> LiveServer:
    """Start a server on a free port; if another process took the port before the server bound it, try another."""
    for attempt in range(3):
        server = _start_once(model_dir, log_dir, args, env)
        if not wait_ready:
            return server
        try:
            wait_until_ready(server, timeout)
            return server
        except RuntimeError:
            if attempt == 2 or server.process.poll() is None or "address already in use" not in server.log().lower():
                raise
    raise AssertionError("unreachable")


def _start_once(model_dir: Path, log_dir: Path, args: tuple[str, ...], env: dict[str, str] | None) -> LiveServer:
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "vlmserve.server.cli", "serve", "--model", str(model_dir), "--port", str(port), *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    name = args[args.index("--served-model-name") + 1] if "--served-model-name" in args else model_dir.name
    return LiveServer(f"http://127.0.0.1:{port}", process, log_path, name)


def wait_until_ready(server: LiveServer, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log()}")
