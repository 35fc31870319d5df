"""The web chat page at `/`, driven in a real browser (Playwright for Python over Debian's Chromium).

Two servers: the embedded SHAPES model (the session's `default_server`), which answers questions about the
images the page uploads, and a slow tiny checkpoint behind `--api-keys` with one slot and no queue (each engine step
sleeps, through a launcher that patches the server's own class, as tests/test_overload.py does), for the key field,
Stop and a 429. Every test checks that the page asked nothing of any other origin. Screenshots at 1280x800 and
390x844 land in the test's tmp dir (the path is printed).

Without Chromium or playwright the tests skip, except under `CI=true` (.ci/run sets it), where they fail.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import LiveServer, free_port, wait_until_ready

from vlmserve.training.world import COLOR_RGB, Shape, World, draw

CHROMIUM = os.environ.get("VLMSERVE_CHROMIUM", "/usr/bin/chromium")
KEY = "web-ui-test-key"
STEP_DELAY = 0.03  # seconds slept by each engine step of the slow server
SETTING_LABELS = {"temperature": "Temperature", "max_tokens": "Max tokens", "seed": "Seed",
                  "system_prompt": "System prompt", "api_key": "API key"}


def _require_browser() -> None:
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (pip install -e '.[test]')"
    if reason is None and not Path(CHROMIUM).exists():
        reason = f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser tests cannot run in CI: {reason}")
        pytest.skip(reason)


def shapes_png(*shapes: tuple[str, str], size: int = 128) -> bytes:
    """A SHAPES scene (training/world.py's renderer): each (color, shape) in its own column."""
    side = size * 0.28
    objects = tuple(Shape(color, shape, 8 + i * (side + 8), size * 0.35, side, COLOR_RGB[color])
                    for i, (color, shape) in enumerate(shapes))
    buf = io.BytesIO()
    draw(World(size, 235, True, objects)).save(buf, "PNG")
    return buf.getvalue()


def metric(server: LiveServer, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def poll(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# ------------------------------------------------------------------------------------------------------- fixtures
SLOW_LAUNCHER = f"""
import sys, time
from vlmserve.server.engine import core
original_step = core.EngineCore.step
def step(self):
    time.sleep({STEP_DELAY})
    return original_step(self)
core.EngineCore.step = step
from vlmserve.server.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def slow_server(checkpoint_factory: Callable[[str], Path],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The tiny CLIP + Llama checkpoint, each step slowed, behind an API key, one slot and no queue."""
    port = free_port()
    logs = tmp_path_factory.mktemp("web-ui")
    log_path = logs / "slow-server.log"
    cmd = [sys.executable, "-c", SLOW_LAUNCHER, "serve", "--model", str(checkpoint_factory("clip-llama")),
           "--port", str(port), "--served-model-name", "slow-llava", "--api-keys", KEY, "--max-running", "1",
           "--max-waiting", "0"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    server = LiveServer(f"http://127.0.0.1:{port}", process, log_path, "slow-llava")
    try:
        wait_until_ready(server, timeout=120)
        yield server
    finally:
        server.stop(signal.SIGKILL)


class Page:
    """A fresh browser context (its own localStorage) at `/`, recording every request the page makes."""

    def __init__(self, browser: Any, server: LiveServer, width: int = 1280, height: int = 800) -> None:
        self.server = server
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.set_default_timeout(30_000)
        self.page.goto(server.url + "/")

    def attach(self, png: bytes, name: str = "scene.png") -> None:
        self.page.get_by_label("Image", exact=True).set_input_files(
            files=[{"name": name, "mimeType": "image/png", "buffer": png}])

    def ask(self, text: str) -> Any:
        """Send `text`; the answer's element once it has finished (or failed)."""
        answers = self.page.locator(".turn.assistant, .turn.error")
        before = answers.count()
        self.page.get_by_label("Message", exact=True).fill(text)
        self.page.get_by_role("button", name="Send", exact=True).click()
        self.page.wait_for_function("n => document.querySelectorAll('.turn.assistant:not([aria-busy]), "
                                    ".turn.error').length > n", arg=before)
        return self.page.locator(".turn.assistant:not([aria-busy]), .turn.error").last

    def settings(self, **values: str) -> None:
        details = self.page.locator("#settings")
        if not details.evaluate("d => d.open"):
            self.page.get_by_text("Settings", exact=True).click()
        for field, value in values.items():
            self.page.get_by_label(SETTING_LABELS[field], exact=True).fill(value)

    def close(self) -> None:
        origin = self.server.url
        foreign = [u for u in self.requests if not (u == origin or u.startswith(origin + "/") or u.startswith("data:"))]
        assert not foreign, f"the page reached other origins: {foreign}"
        assert not self.errors, self.errors
        self.context.close()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[..., Page]]:
    pages: list[Page] = []

    def make(server: LiveServer, **size: int) -> Page:
        pages.append(Page(browser, server, **size))
        return pages[-1]

    yield make
    for page in pages:
        page.close()


def requests_to(page: Page, path: str) -> list[dict[str, Any]]:
    """Record the JSON bodies and headers of the page's requests to `path` from now on (they go on unchanged)."""
    seen: list[dict[str, Any]] = []

    def handle(route: Any) -> None:
        seen.append({"body": json.loads(route.request.post_data or "null"), "headers": route.request.headers})
        route.continue_()

    page.page.route(f"**{path}", handle)
    return seen


# ------------------------------------------------------------------------------------------------------- SHAPES
def test_the_page_answers_about_an_uploaded_image(default_server: LiveServer, open_page: Callable[..., Page],
                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    """The accessible controls are there; an uploaded SHAPES image and a question get the right answer, streamed,
    with its figures; the second turn sends the first as history and reuses its cached prefix."""
    ui = open_page(default_server)
    page = ui.page
    stop = page.get_by_role("button", name="Stop", exact=True)
    assert stop.is_disabled() and page.get_by_role("button", name="Send", exact=True).is_enabled()
    assert page.get_by_role("log").count() == 1
    assert page.get_by_role("textbox", name="Message", exact=True).count() == 1
    page.wait_for_function("() => document.querySelector('#model').textContent === 'shapes-llava'")
    sent = requests_to(ui, "/v1/chat/completions")
    ui.attach(shapes_png(("red", "circle")))
    with page.expect_response("**/v1/chat/completions") as response:
        answer = ui.ask("What color is the circle?")
    assert response.value.headers["content-type"].startswith("text/event-stream")
    assert answer.locator(".text").inner_text().strip() == "red"
    stats = answer.locator(".stats").inner_text()
    assert re.search(r"TTFT [\d.]+ (ms|s)", stats) and re.search(r"prompt \d+ \(\d+ cached\)", stats), stats
    body = sent[0]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert [p["type"] for p in body["messages"][0]["content"]] == ["image_url", "text"]

    answer = ui.ask("What shape is the red object?")
    assert answer.locator(".text").inner_text().strip() == "circle"
    history = sent[1]["body"]["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[1]["content"].strip() == "red"
    cached = re.search(r"\((\d+) cached\)", answer.locator(".stats").inner_text())
    assert cached and int(cached.group(1)) >= 64, "the second turn reuses the first turn's image blocks"
    log_text = page.get_by_role("log").inner_text()
    assert "What color is the circle?" in log_text and "What shape is the red object?" in log_text
    page.wait_for_function("() => document.querySelector('[data-metric=running]').textContent === '0'")
    shots = tmp_path_factory.mktemp("screenshots")
    page.screenshot(path=str(shots / "chat-1280x800.png"))
    print(f"screenshots in {shots}")


def _drop_script() -> str:
    return """([b64, name, kind]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: 'image/png'}));
        if (kind === 'paste') {
            document.querySelector('#message').dispatchEvent(
                new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true, cancelable: true}));
        } else {
            const target = document.querySelector('#log');
            for (const type of ['dragenter', 'dragover', 'drop'])
                target.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }
    }"""


def test_dropped_and_pasted_images_are_attached(default_server: LiveServer, open_page: Callable[..., Page]) -> None:
    import base64

    ui = open_page(default_server)
    page = ui.page
    blue = base64.b64encode(shapes_png(("blue", "square"))).decode()
    page.evaluate(_drop_script(), [blue, "dropped.png", "drop"])
    page.wait_for_selector("#attachments .thumb")
    assert ui.ask("What color is the square?").locator(".text").inner_text().strip() == "blue"

    page.get_by_role("button", name="New chat").click()
    green = base64.b64encode(shapes_png(("green", "triangle"))).decode()
    page.evaluate(_drop_script(), [green, "pasted.png", "paste"])
    page.wait_for_selector("#attachments .thumb")
    assert page.locator("#attachments .thumb").count() == 1
    assert page.get_by_label("Message", exact=True).input_value() == ""  # the image, not its name, was pasted
    assert ui.ask("What shape is the green object?").locator(".text").inner_text().strip() == "triangle"


def test_settings_shape_the_request_and_persist(default_server: LiveServer, open_page: Callable[..., Page]) -> None:
    ui = open_page(default_server)
    sent = requests_to(ui, "/v1/chat/completions")
    ui.settings(temperature="0", max_tokens="3", seed="7", system_prompt="Answer in one word.")
    ui.attach(shapes_png(("yellow", "circle"), ("red", "square")))
    answer = ui.ask("Describe the image.")
    body = sent[0]["body"]
    assert (body["temperature"], body["max_tokens"], body["seed"]) == (0, 3, 7)
    assert body["messages"][0] == {"role": "system", "content": "Answer in one word."}
    assert "cut at max tokens" in answer.locator(".stats").inner_text()
    assert re.search(r"\b3 tokens\b", answer.locator(".stats").inner_text())
    ui.page.reload()
    ui.settings()
    assert ui.page.get_by_label("Seed", exact=True).input_value() == "7"
    assert ui.page.get_by_label("System prompt", exact=True).input_value() == "Answer in one word."


def test_no_horizontal_scroll_on_a_phone(default_server: LiveServer, open_page: Callable[..., Page],
                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    ui = open_page(default_server, width=390, height=844)
    page = ui.page
    ui.attach(shapes_png(("purple", "triangle"), ("orange", "circle"), ("green", "square"), size=256))
    answer = ui.ask("How many shapes are there?")
    assert answer.locator(".text").inner_text().strip() == "three"
    ui.attach(shapes_png(("red", "circle")))
    page.get_by_label("Message", exact=True).fill("an-unbroken-word-" * 20)
    widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth,"
                           " document.body.scrollWidth]")
    assert widths[0] <= widths[1] and widths[2] <= widths[1], widths
    for control in ("Send", "Stop"):
        box = page.get_by_role("button", name=control, exact=True).bounding_box()
        assert box is not None and box["x"] + box["width"] <= 390
    shots = tmp_path_factory.mktemp("screenshots")
    page.screenshot(path=str(shots / "chat-390x844.png"))
    print(f"screenshots in {shots}")


# ------------------------------------------------------------------------------------- keys, Stop and a full queue
def test_the_key_field_authorises_the_api_calls(slow_server: LiveServer, open_page: Callable[..., Page]) -> None:
    ui = open_page(slow_server)
    page = ui.page
    page.wait_for_function("() => document.querySelector('#model').textContent.includes('API key')")
    ui.settings(max_tokens="4")
    error = ui.ask("hello")
    assert "HTTP 401" in error.inner_text() and "API key" in error.inner_text()
    sent = requests_to(ui, "/v1/chat/completions")
    ui.settings(api_key=KEY)
    page.get_by_label("API key", exact=True).press("Tab")  # a change event: the model name is fetched again
    page.wait_for_function("() => document.querySelector('#model').textContent === 'slow-llava'")
    answer = ui.ask("hello")
    assert "assistant" in (answer.get_attribute("class") or ""), answer.inner_text()
    assert sent[0]["headers"]["authorization"] == f"Bearer {KEY}"
    page.reload()  # the key was kept in localStorage
    page.wait_for_function("() => document.querySelector('#model').textContent === 'slow-llava'")


def _keyed(page: Page) -> None:
    page.page.evaluate(f"localStorage.setItem('vlmserve.apiKey', {KEY!r})")
    page.page.reload()
    page.page.wait_for_function("() => document.querySelector('#model').textContent === 'slow-llava'")


def test_stop_cancels_the_generation(slow_server: LiveServer, open_page: Callable[..., Page]) -> None:
    """Stop aborts the fetch mid-stream; the server cancels the request at once (its running count returns to 0
    long before the answer would have ended)."""
    ui = open_page(slow_server)
    page = ui.page
    _keyed(ui)
    ui.settings(max_tokens="200")

    def never_ending(route: Any) -> None:  # no end-of-sequence either: the answer would take 200 slow steps
        route.continue_(post_data=json.dumps({**json.loads(route.request.post_data), "ignore_eos": True}))

    page.route("**/v1/chat/completions", never_ending)
    cancelled = metric(slow_server, "vlmserve:request_cancelled_total")
    page.get_by_label("Message", exact=True).fill("tell me everything")
    page.get_by_role("button", name="Send", exact=True).click()
    page.wait_for_function("() => document.querySelector('.turn.assistant .text').textContent.length > 0")
    assert metric(slow_server, "vlmserve:num_requests_running") == 1
    stop = page.get_by_role("button", name="Stop", exact=True)
    started = time.monotonic()
    stop.click()
    page.wait_for_selector(".turn.assistant:not([aria-busy])")
    assert "stopped" in page.locator(".turn.assistant .stats").inner_text()
    assert poll(lambda: metric(slow_server, "vlmserve:num_requests_running") == 0, 5)
    assert time.monotonic() - started < 200 * STEP_DELAY
    assert poll(lambda: metric(slow_server, "vlmserve:request_cancelled_total") == cancelled + 1, 5)
    assert stop.is_disabled() and page.get_by_role("button", name="Send", exact=True).is_enabled()


def test_a_full_queue_shows_when_to_retry(slow_server: LiveServer, open_page: Callable[..., Page]) -> None:
    """One slot, no queue: while another client's long answer streams, the page's request gets 429, shown with
    its Retry-After."""
    ui = open_page(slow_server)
    _keyed(ui)
    body = {"messages": [{"role": "user", "content": "hold the slot"}], "max_tokens": 200, "ignore_eos": True,
            "stream": True}
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with httpx.stream("POST", slow_server.url + "/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            for _ in response.iter_raw():
                holding.set()
                if release.is_set():
                    return

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        assert holding.wait(30)
        error = ui.ask("hello")
        text = error.inner_text()
        assert "HTTP 429" in text and re.search(r"Retry in \d+ s", text), text
        assert "turn error" in (error.get_attribute("class") or "")
    finally:
        release.set()
        holder.join(30)
    assert poll(lambda: metric(slow_server, "vlmserve:num_requests_running") == 0, 10)


def test_assets_stay_on_the_page_origin(default_server: LiveServer) -> None:
    """Every shipped file is served, no asset names another origin, and the policy forbids reaching one."""
    from vlmserve.server.webui import ui_assets

    for name, path in ui_assets().items():
        text = path.read_text()
        assert not re.search(r"\b(https?:)?//[\w-]+\.[\w.-]+", text), name
        url = default_server.url + ("/" if name == "index.html" else f"/ui/{name}")
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200 and response.content == path.read_bytes(), name
        assert "connect-src 'self'" in response.headers["content-security-policy"]


def test_no_ui_turns_the_page_off() -> None:
    """`--no-ui` (VLMSERVE_NO_UI) leaves `/` and the assets unrouted (404 in the API's error shape); the API stays."""
    from fastapi.testclient import TestClient

    from vlmserve.server.api import create_app
    from vlmserve.server.cli import _settings_from_args, build_parser
    from vlmserve.server.settings import Settings

    assert _settings_from_args(build_parser().parse_args(["serve", "--no-ui"])).no_ui is True
    assert _settings_from_args(build_parser().parse_args(["serve"])).no_ui is False
    on, off = TestClient(create_app(Settings())), TestClient(create_app(Settings(no_ui=True)))
    assert on.get("/").headers["content-type"].startswith("text/html") and on.head("/").status_code == 200
    assert on.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert on.get("/ui/missing.js").status_code == 404
    for path in ("/", "/ui/app.js"):
        response = off.get(path)
        assert response.status_code == 404 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert off.get("/health").status_code == 200
