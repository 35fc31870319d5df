"""The client commands as a person uses them, against the embedded SHAPES model over HTTP: `eval` shows a progress
bar and a table (no log line per request), `chat` holds a conversation in a pseudo-terminal, `ask --image -` reads
the image from standard input."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from live_server import LiveServer
from PIL import Image

from vlmserve.training.world import COLOR_RGB, Shape, World, draw

CLI = [sys.executable, "-m", "vlmserve.server.cli"]


def red_circle() -> bytes:
    buf = io.BytesIO()
    draw(World(128, 235, True, (Shape("red", "circle", 40, 40, 40, COLOR_RGB["red"]),))).save(buf, "PNG")
    return buf.getvalue()


def test_eval_shows_a_bar_and_a_table_and_no_request_lines(default_server: LiveServer) -> None:
    out = subprocess.run([*CLI, "eval", "--url", default_server.url, "--n", "10", "--seed", "5"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    both = out.stdout + out.stderr
    assert "HTTP Request" not in both and "POST " not in both, both[-2000:]
    assert "10/10" in out.stderr  # the progress bar, on stderr
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line.strip()}
    assert {"color", "shape", "count", "exists", "caption", "overall"} <= set(rows)
    assert rows["overall"][1] == "10" and rows["overall"][2].endswith("%")
    machine = subprocess.run([*CLI, "eval", "--url", default_server.url, "--n", "5", "--json"], capture_output=True,
                             text=True, timeout=300)
    assert machine.returncode == 0, machine.stderr[-2000:]
    result = json.loads(machine.stdout)
    assert result["n"] == 5 and set(result["per_kind"]) >= {"color", "caption"}


def test_ask_reads_the_image_from_stdin(default_server: LiveServer) -> None:
    out = subprocess.run([*CLI, "ask", "--url", default_server.url, "--image", "-", "--temperature", "0",
                          "What color is the circle?"], input=red_circle(), capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.decode().strip() == "red"
    twice = subprocess.run([*CLI, "ask", "--url", default_server.url, "--image", "-", "--image", "-", "hi"],
                           input=b"", capture_output=True, timeout=120)
    assert twice.returncode == 2 and b"once" in twice.stderr


class Terminal:
    """A command on a pseudo-terminal: what it writes, and lines typed into it."""

    def __init__(self, cmd: list[str]) -> None:
        self.fd, child = pty.openpty()
        self.process = subprocess.Popen(cmd, stdin=child, stdout=child, stderr=child, close_fds=True,
                                        env={**os.environ, "TERM": "dumb", "NO_COLOR": "1"})
        os.close(child)
        self.seen = ""

    def expect(self, text: str, timeout: float = 60) -> str:
        """Read until `text` has appeared (after what earlier calls consumed); returns what was read up to it."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} in {self.seen!r}"
            ready, _, _ = select.select([self.fd], [], [], min(left, 1))
            if ready:
                try:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    assert text in self.seen, f"no {text!r} in {self.seen!r}"
        before, _, self.seen = self.seen.partition(text)
        return before

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        os.close(self.fd)


def test_chat_answers_two_turns_in_a_terminal(default_server: LiveServer, tmp_path: Path) -> None:
    image = tmp_path / "circle.png"
    image.write_bytes(red_circle())
    term = Terminal([*CLI, "chat", "--url", default_server.url, "--temperature", "0"])
    try:
        term.expect("/image PATH")  # the banner names the commands
        term.expect("> ")
        term.type(f"/image {image}")
        term.expect("attached")
        term.expect("> ")
        term.type("What color is the circle?")
        first = term.expect("> ")
        term.type("What shape is the red object?")
        second = term.expect("> ")
        # the terminal echoes each typed line; the answer is the last line before the next prompt
        assert first.strip().splitlines()[-1].strip() == "red", first
        assert second.strip().splitlines()[-1].strip() == "circle", second
        os.write(term.fd, b"\x04")  # Ctrl-D at an empty prompt: leave
        assert term.process.wait(30) == 0
    finally:
        term.close()


def test_chat_without_a_terminal_prints_answers_only(default_server: LiveServer, tmp_path: Path) -> None:
    image = tmp_path / "circle.png"
    Image.open(io.BytesIO(red_circle())).save(image)
    out = subprocess.run([*CLI, "chat", "--url", default_server.url, "--image", str(image), "--temperature", "0"],
                         input="What color is the circle?\n/reset\n/nonsense\n", capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == "red\n"
    assert "new conversation" in out.stderr and "/image PATH" in out.stderr
