"""The Docker files agree with each other and with the package: the build context, the compose files, the proof script.

Cheap checks that run everywhere (no podman): the image itself is built and proven by deploy/prove_image.py in CI
(`.ci/run`; tests/test_image_proof.py holds its tests that need podman).
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# The Compose Specification's schema, compose-spec/compose-spec schema/compose-spec.json at 170098b (Apache-2.0).
COMPOSE_SCHEMA = json.loads((Path(__file__).parent / "data" / "compose-spec.json").read_text())


def load_prove_image() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prove_image", ROOT / "deploy" / "prove_image.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("prove_image", module)
    spec.loader.exec_module(module)
    return module


prove_image = load_prove_image()


# ------------------------------------------------------------------------------------------------ the build context


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker's (moby/patternmatcher) regular expression."""
    out, i = "^", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out += ".*" if i >= len(pattern) else "(.*/)?"
            continue
        out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
        i += 1
    return re.compile(out + "$")


def excluded(path: str, lines: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides; `!` re-includes."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for line in lines:
        negate = line.startswith("!")
        regex = _dockerignore_regex(line[1:] if negate else line)
        if any(regex.match(c) for c in candidates):
            verdict = not negate
    return verdict


def dockerignore() -> list[str]:
    text = (ROOT / ".dockerignore").read_text()
    return [ln.strip().lstrip("/") for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_the_build_context_holds_what_pip_install_needs_and_no_more() -> None:
    lines = dockerignore()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", project["project"]["readme"], "client/pyproject.toml", "client/README.md"]
    needed += [f"{folder}/__init__.py" for folder in project["tool"]["setuptools"]["package-dir"].values()]
    needed += [f"weights/{p}" for p in project["tool"]["setuptools"]["package-data"]["vlmserve.weights"]]
    for path in needed:
        assert not excluded(path.replace("*", "config.json"), lines), path
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    packaged = ("model/", "server/", "training/", "weights/", "client/")
    for path in tracked:
        assert excluded(path, lines) != (path.startswith(packaged) or path in needed), path
    for junk in [".venv/bin/python", ".venv/lib/python3.11/site-packages/torch/__init__.py", "tests/test_docker.py",
                 "benchmarks/bench_vllm.py", ".git/HEAD", ".mypy_cache/3.11/x.json", ".pytest_cache/v/x",
                 ".ruff_cache/x", ".hypothesis/examples/x", ".typecheck/vlmserve/model", "vlmserve.egg-info/PKG-INFO",
                 "client/vlmserve_client.egg-info/PKG-INFO", "model/__pycache__/vlm.cpython-311.pyc",
                 "server/engine/__pycache__/core.cpython-311.pyc", "runs/stage1/model.safetensors", "build/lib/x.py",
                 "deploy/prove_image.py", "scratch.txt"]:
        assert excluded(junk, lines), junk


def test_the_dockerignore_matcher_follows_docker() -> None:
    assert excluded("a/b/__pycache__/c.pyc", ["**/__pycache__"])
    assert not excluded("src/x.py", ["*", "!src"])
    assert excluded("src/x.pyc", ["*", "!src", "**/*.pyc"])
    assert excluded("docs/a/b.md", ["docs"]) and not excluded("docsx/a", ["docs"])


# ---------------------------------------------------------------------------------------------------- compose files


def _compose(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / name).read_text())
    return data


def _default(value: str) -> str:
    """`${VAR:-default}` read as Compose does with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _duration(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", value))


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.cuda.yml"])
def test_compose_files_follow_the_compose_specification(name: str) -> None:
    jsonschema.Draft7Validator(COMPOSE_SCHEMA).validate(_compose(name))


def test_the_schema_catches_a_misspelt_key() -> None:
    bad = _compose("docker-compose.cuda.yml")
    bad["services"]["vlmserve"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilites"] = ["gpu"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(COMPOSE_SCHEMA).validate(bad)


def _dockerfile_arg_default(name: str) -> str:
    match = re.search(rf"^ARG {name}=(.*)$", DOCKERFILE, flags=re.M)
    assert match, name
    return match.group(1).strip().strip('"')


def test_compose_serves_the_cpu_image_with_the_dockerfiles_healthcheck() -> None:
    service = _compose("docker-compose.yml")["services"]["vlmserve"]
    assert service["ports"] == ["8000:8000"]
    assert "EXPOSE 8000" in DOCKERFILE
    assert service["build"]["context"] == "."
    cpu_index = _dockerfile_arg_default("PIP_EXTRA_INDEX_URL")
    assert "/cpu" in cpu_index
    assert _default(service["build"]["args"]["PIP_EXTRA_INDEX_URL"]) == cpu_index
    test = prove_image.dockerfile_healthcheck(DOCKERFILE)
    assert test[0] == "CMD-SHELL" and "/ready" in test[1]
    assert service["healthcheck"]["test"] == ["CMD", *shlex.split(test[1])]
    options = dict(re.findall(r"--([\w-]+)=(\S+)", next(a for k, a in prove_image.dockerfile_instructions(DOCKERFILE)
                                                          if k == "HEALTHCHECK")))
    for key in ("interval", "timeout", "start-period"):
        assert _duration(service["healthcheck"][key.replace("-", "_")]) == _duration(options[key]), key
    assert service["healthcheck"]["retries"] == int(options["retries"])


def test_the_cuda_override_reserves_a_gpu_and_takes_pypis_cuda_torch() -> None:
    service = _compose("docker-compose.cuda.yml")["services"]["vlmserve"]
    assert service["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    args = service["build"]["args"]
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:")
    assert _default(args["PIP_EXTRA_INDEX_URL"]) == ""  # PyPI's own torch: the CUDA build
    assert service["environment"]["VLMSERVE_DEVICE"] == "cuda"
    assert service["image"] != _compose("docker-compose.yml")["services"]["vlmserve"]["image"]


# ------------------------------------------------------------------------------------------------ the proof script


def test_the_proof_reads_the_dockerfile() -> None:
    assert prove_image.dockerfile_torch_version(DOCKERFILE) == "2.13.0"
    text = 'FROM x\nHEALTHCHECK --interval=5s \\\n  CMD ["curl", "-f", "http://localhost/"]\nCMD ["a"]\n'
    assert prove_image.dockerfile_healthcheck(text) == ["CMD", "curl", "-f", "http://localhost/"]
    assert prove_image.dockerfile_healthcheck("FROM x\nHEALTHCHECK NONE\n") == ["NONE"]
    assert prove_image.dockerfile_healthcheck("FROM x\n") is None
    assert [k for k, _ in prove_image.dockerfile_instructions(DOCKERFILE)][:2] == ["ARG", "FROM"]


@pytest.mark.parametrize(("shape", "rgb"), [(shape, rgb) for shape, rgb, _, _ in prove_image.QUESTIONS])
def test_the_proofs_images_are_shapes_scenes(shape: str, rgb: tuple[int, int, int]) -> None:
    image = Image.open(io.BytesIO(prove_image.shape_png(shape, rgb)))
    assert image.size == (128, 128) and image.mode == "RGB"
    assert image.getpixel((58, 64)) == rgb and image.getpixel((5, 5)) == (240, 240, 240)
    corner = image.getpixel((40, 40))  # the box's top-left corner: inside a square only
    assert (corner == rgb) == (shape == "square")
