"""The embedded default model end to end: a regular (non-editable) install serves it with no --model; it sees and
it hears.

A wheel is built from the source tree and unpacked into a folder of its own; `vlmserve serve` runs from there, so
the default model must be found as package data, exactly as after `pip install .` or in the Docker image.
"""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer, free_port, wait_until_ready
from PIL import Image, ImageDraw

from vlmserve.server.webui import ui_assets
from vlmserve.training.eval_sounds import make_sounds_eval_set

ROOT = Path(__file__).resolve().parent.parent


def _png(draw: str, color: tuple[int, int, int], size: int = 128) -> bytes:
    image = Image.new("RGB", (size, size), (240, 240, 240))
    d = ImageDraw.Draw(image)
    box = (size * 0.3, size * 0.3, size * 0.6, size * 0.6)
    if draw == "circle":
        d.ellipse(box, fill=color)
    elif draw == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=color)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def installed_server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy: no build/ or egg-info left in the checkout, and no stale build/lib in the wheel.
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(tmp)], check=True,
                   capture_output=True)
    wheel = next(tmp.glob("vlmserve-*.whl"))
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "vlmserve/weights/shapes-llava/config.json" in names
        assert {f"vlmserve/weights/shapes-llava/audio/{f}" for f in
                ("config.json", "model.safetensors", "preprocessor_config.json")} <= set(names)
        assert any(n.startswith("vlmserve/weights/shapes-llava/model") and n.endswith(".safetensors") for n in names)
        assert {"index.html", "app.js", "style.css"} <= set(ui_assets())
        missing = [name for name in ui_assets() if f"vlmserve/server/ui/{name}" not in names]
        assert not missing, f"web page files missing from the wheel (pyproject's package-data): {missing}"
        z.extractall(site)
    port = free_port()
    log_path = tmp / "server.log"
    env = {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "vlmserve.server.cli", "serve", "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    server = LiveServer(f"http://127.0.0.1:{port}", process, log_path, "shapes-llava")
    wait_until_ready(server, timeout=120)
    yield server
    assert server.stop() == 0


def _ask(server: LiveServer, image: bytes, question: str) -> str:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": question}]}],
            "temperature": 0, "max_tokens": 24}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"].strip().lower().rstrip(".")


def test_default_model_is_served_from_a_regular_install(installed_server: LiveServer) -> None:
    models = httpx.get(installed_server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["shapes-llava"]
    assert "/site/vlmserve/weights/shapes-llava" in installed_server.log()


def test_what_color_is_the_circle(installed_server: LiveServer) -> None:
    assert _ask(installed_server, _png("circle", (220, 40, 40)), "What color is the circle?") == "red"
    assert _ask(installed_server, _png("circle", (40, 80, 220)), "What color is the circle?") == "blue"
    assert _ask(installed_server, _png("square", (40, 170, 60)), "What shape is the green object?") == "square"
    assert _ask(installed_server, _png("triangle", (235, 200, 30)), "How many shapes are there?") == "one"


def test_the_default_model_hears(installed_server: LiveServer) -> None:
    """Clips of the independent SOUNDS renderer, one of each question kind (the model reads 98%+ of them right)."""
    items = make_sounds_eval_set(10, seed=11)
    answers = []
    for item in items:
        part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(item.audio).decode(), "format": "wav"}}
        body = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": item.question}]}],
                "temperature": 0, "max_tokens": 40}
        r = httpx.post(installed_server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["message"]["content"].strip().lower().rstrip("."))
    assert {item.kind for item in items} == {"count", "pitch", "kind", "exists", "caption"}
    right = [a == item.answer for a, item in zip(answers, items, strict=True)]
    assert sum(right) >= 9, list(zip(answers, [item.answer for item in items], strict=True))


def test_the_installed_server_serves_the_web_page(installed_server: LiveServer) -> None:
    """Every file of the page comes from the wheel, byte for byte the source tree's (no build step)."""
    for name, path in ui_assets().items():
        response = httpx.get(installed_server.url + ("/" if name == "index.html" else f"/ui/{name}"), timeout=10)
        assert response.status_code == 200 and response.content == path.read_bytes(), name
