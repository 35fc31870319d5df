"""The image proof's own tests, on the real builder: broken images fail the proof; the build context and the
compose files as Docker's tools read them.

`.ci/run` runs these after deploy/prove_image.py has proven the real image, so the broken copies of the Dockerfile
below reuse its cached layers: `VLMSERVE_IMAGE_PROOF=1 python -m pytest -q tests/test_image_proof.py`. They need
root, podman, debootstrap and Debian's docker-compose (`.ci/run` installs them); without VLMSERVE_IMAGE_PROOF=1 they
are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_docker import dockerignore, excluded, prove_image

pytestmark = pytest.mark.skipif(os.environ.get("VLMSERVE_IMAGE_PROOF") != "1",
                                reason="the image proof's tests: VLMSERVE_IMAGE_PROOF=1 (root, podman; .ci/run)")

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
CMD = 'CMD ["vlmserve", "serve", "--host", "0.0.0.0"]'


def _prove(tmp_path: Path, dockerfile: str, name: str) -> tuple[int, dict[str, Any]]:
    path = tmp_path / "Dockerfile"
    path.write_text(dockerfile)
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, str(ROOT / "deploy" / "prove_image.py"), "--dockerfile", str(path),
                           "--tag", f"localhost/vlmserve:proof-{name}", "--rm-image", "--fail-fast",
                           "--json-out", str(out)], capture_output=True, text=True, timeout=1500)
    assert out.exists(), proc.stderr[-3000:]
    summary: dict[str, Any] = json.loads(out.read_text())
    return proc.returncode, summary


BROKEN = {  # name: (the Dockerfile changed so, a failure the proof must name)
    "cmd": (DOCKERFILE.replace(CMD, CMD[:-1] + ', "--model", "/no/such/checkpoint"]'), "exited with status"),
    "run": (DOCKERFILE.replace("\nUSER vlmserve\n", "\nRUN exit 3\nUSER vlmserve\n"), "podman build"),
    "user": (DOCKERFILE.replace("\nUSER vlmserve\n", "\n"), "runs as root"),
    # (decoding eagerly: ready in seconds, not after the decode step's compile)
    "healthcheck": (DOCKERFILE.replace("127.0.0.1:8000/ready", "127.0.0.1:8001/ready").replace(
        "\nUSER vlmserve\n", "\nENV VLMSERVE_COMPILE=false\nUSER vlmserve\n"), "HEALTHCHECK exited"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_image_fails_the_proof(tmp_path: Path, name: str) -> None:
    dockerfile, failure = BROKEN[name]
    assert dockerfile != DOCKERFILE
    code, summary = _prove(tmp_path, dockerfile, name)
    assert code == 1 and not summary["ok"], summary
    assert any(failure in f for f in summary["failures"]), summary["failures"]


def test_the_builder_sees_the_context_the_dockerignore_test_expects(tmp_path: Path) -> None:
    """What podman's COPY . carries is what tests/test_docker.py's reading of .dockerignore says (the whole tree,
    with a README-made .venv and the caches as they lie)."""
    mirror, suite = prove_image.apt_mirror_and_suite()
    base, _, _ = prove_image.base_image(prove_image.DEFAULT_CACHE, mirror, suite)
    (tmp_path / "Dockerfile").write_text(f"FROM {base}\nCOPY . /context\n")
    tag = "localhost/vlmserve:proof-context"
    prove_image.run(["podman", "build", "--isolation", "chroot", "-f", str(tmp_path / "Dockerfile"), "-t", tag,
                     str(ROOT)])
    try:
        with prove_image.container_root(tag, "vlmserve-proof-context", ["/bin/true"]) as rootfs:
            context = rootfs / "context"
            copied = {str(p.relative_to(context)) for p in context.rglob("*") if not p.is_dir()}
    finally:
        prove_image.run(["podman", "rmi", "-f", tag], check=False)
    lines = dockerignore()
    expected = set()
    for folder, dirs, files in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT)
        dirs[:] = [d for d in dirs if not (rel == Path(".") and d in (".git", ".venv"))]
        expected |= {str(rel / f) for f in files if not excluded(str(rel / f), lines)}
    assert copied == expected
    assert "pyproject.toml" in copied and "weights/shapes-llava/model.safetensors" in copied


def _compose_config(*files: str) -> dict[str, Any]:
    cmd = ["docker-compose"] + [a for f in files for a in ("-f", f)] + ["config"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if not k.startswith(("TORCH_", "VLMSERVE_"))})
    assert out.returncode == 0, out.stderr
    config: dict[str, Any] = yaml.safe_load(out.stdout)
    return config


def test_docker_compose_reads_both_files() -> None:
    cpu = _compose_config("docker-compose.yml")["services"]["vlmserve"]
    assert cpu["ports"] in ([{"published": 8000, "target": 8000}], ["8000:8000"])
    assert cpu["build"]["args"]["PIP_EXTRA_INDEX_URL"].endswith("/cpu")
    assert cpu["healthcheck"]["test"][:2] == ["CMD", "python3"]
    cuda = _compose_config("docker-compose.yml", "docker-compose.cuda.yml")["services"]["vlmserve"]
    assert cuda["build"]["args"] == {"BASE_IMAGE": "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04",
                                     "PIP_EXTRA_INDEX_URL": ""}
    assert cuda["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert cuda["ports"] == cpu["ports"] and cuda["healthcheck"] == cpu["healthcheck"]
    assert cuda["environment"]["VLMSERVE_DEVICE"] == "cuda" and cuda["image"] == "vlmserve:cuda"
