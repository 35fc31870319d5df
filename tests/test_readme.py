"""The README is executable: its set-up commands match CI and the Dockerfile, its examples run against the server."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from vlmserve.server.settings import settings_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    """The README's examples in `lang`, but the audio ones (tests/test_audio.py runs those: the default model has no
    audio tower yet)."""
    return [b for b in re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S) if "beeps.wav" not in b]


def test_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = [b.strip() for b in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    serve, test = commands
    assert serve.endswith("vlmserve serve") and "pip install torch==2.13.0 ." in serve
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines(), "the README's test command must be the line .ci/run executes"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install torch==2.13.0 ./src" in dockerfile
    assert 'CMD ["vlmserve", "serve", "--host", "0.0.0.0"]' in dockerfile


def test_configuration_table_is_generated_from_settings() -> None:
    table = README.split("<!-- settings-table:start -->\n", 1)[1].split("<!-- settings-table:end -->", 1)[0]
    assert table.strip() == settings_table().strip()


@pytest.mark.parametrize("command", ["serve", "ask", "chat", "bench", "train", "eval"])
def test_every_command_prints_its_help(command: str) -> None:
    """`--help` of each command exits 0 and names every settings flag of `serve` (a help text with a bare `%` once
    crashed argparse's formatter)."""
    out = subprocess.run([sys.executable, "-m", "vlmserve.server.cli", command, "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
    if command == "serve":
        from vlmserve.server.settings import Settings

        for name in Settings.model_fields:
            assert "--" + name.replace("_", "-") in out.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding circle.png (a red circle), where the examples run."""
    path = tmp_path_factory.mktemp("readme")
    image = Image.new("RGB", (160, 160), (240, 240, 240))
    ImageDraw.Draw(image).ellipse((40, 50, 95, 105), fill=(220, 40, 40))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    (path / "circle.png").write_bytes(buf.getvalue())
    return path


def _run(cmd: list[str], cwd: Path, url: str) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NO_PROXY": "*"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def _localize(snippet: str, url: str) -> str:
    return snippet.replace("http://127.0.0.1:8000", url)


def test_readme_shell_examples(default_server, workdir: Path) -> None:
    examples = [b for b in _blocks("bash") if "vlmserve ask" in b or "curl" in b]
    assert len(examples) == 4
    for snippet in examples:
        script = _localize(snippet, default_server.url).replace("vlmserve ask", f"{sys.executable} -m "
                                                                                 "vlmserve.server.cli ask")
        if "curl" in script and shutil.which("curl") is None:
            pytest.skip("curl is not installed")
        out = _run(["bash", "-c", script], workdir, default_server.url)
        assert "red" in out.lower(), (snippet, out)


def test_readme_python_examples(default_server, workdir: Path) -> None:
    examples = _blocks("python")
    assert len(examples) == 2  # the openai SDK and vlmserve_client
    for snippet in examples:
        out = _run([sys.executable, "-c", _localize(snippet, default_server.url)], workdir, default_server.url)
        assert "red" in out.lower(), (snippet, out)
