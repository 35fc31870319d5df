"""CONTRIBUTING.md is executable: each of its commands is run here, or checked against what runs it (the set-up is
CI's own install, the whole suite is CI itself and so is each single test file it names, the benchmark is parsed,
not run), and its walk through the request path names files and functions that exist."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDE = (ROOT / "CONTRIBUTING.md").read_text()
README = (ROOT / "README.md").read_text()
FULL_SUITE = "python -m pytest -q"
BENCHMARK = "benchmarks/bench_vllm.py"


def _commands() -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", GUIDE, flags=re.S)]


def _is_setup(command: str) -> bool:
    return command.startswith("python3 -m venv")


def _is_suite_file(command: str) -> bool:
    """`python -m pytest tests/<file> -q`: one file of the suite, which this run runs (as CI runs the whole suite:
    a second pytest process only adds its ~11 s of start-up)."""
    return re.fullmatch(r"python -m pytest tests/test_\w+\.py -q", command) is not None


def _executed() -> list[str]:
    return [c for c in _commands()
            if not _is_setup(c) and c != FULL_SUITE and BENCHMARK not in c and not _is_suite_file(c)]


def _readme_test_command() -> str:
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", setup, flags=re.S)[1].strip()


def _env(tmp_path: Path) -> dict[str, str]:
    """This interpreter's environment first on PATH (the guide's commands assume .venv is active); pre-commit's
    store in a scratch folder."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "PRE_COMMIT_HOME": str(tmp_path / "pre-commit")}


def _bash(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_every_command_is_one_line_and_covered() -> None:
    commands = _commands()
    assert commands and all("\n" not in c for c in commands)
    assert sum(map(_is_setup, commands)) == 1
    assert commands.count(FULL_SUITE) == 1
    assert sum(BENCHMARK in c for c in commands) == 2
    assert {"ruff check .", "mypy", "pre-commit run --all-files"} <= set(_executed())


def test_setup_is_the_ci_install_plus_the_hook(tmp_path: Path) -> None:
    """The set-up installs exactly what the README's test command (CI's line) installs, then the git hook; the hook
    installs (in a scratch repository: this checkout's hooks are its owner's business)."""
    (setup,) = [c for c in _commands() if _is_setup(c)]
    install = _readme_test_command().split(" && ruff check", 1)[0]
    assert setup == f"{install} && pre-commit install"
    repo = tmp_path / "repo"
    repo.mkdir()
    env = _env(tmp_path)
    assert _bash("git init -q .", repo, env).returncode == 0
    shutil.copy(ROOT / ".pre-commit-config.yaml", repo)
    out = _bash("pre-commit install", repo, env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (repo / ".git" / "hooks" / "pre-commit").is_file()


def test_each_single_file_command_names_a_file_of_the_suite() -> None:
    singles = [c for c in _commands() if _is_suite_file(c)]
    assert singles
    for command in singles:
        path = ROOT / command.split()[3]
        assert path.is_file() and re.search(r"^def test_", path.read_text(), flags=re.M), command


def test_the_whole_suite_is_what_ci_runs() -> None:
    test_command = _readme_test_command()
    assert test_command.endswith(f"&& {FULL_SUITE}")
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "&& ruff check . && mypy &&" in test_command  # the checks the guide runs one by one


@pytest.mark.parametrize("command", _executed())
def test_command_runs(command: str, tmp_path: Path) -> None:
    if command.startswith("pre-commit") and not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = _bash(command, ROOT, _env(tmp_path))
    assert out.returncode == 0, f"{command}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"


def test_benchmark_commands_parse() -> None:
    """The benchmark runs for minutes against vLLM's own venv, so here its arguments are parsed by the script's own
    parser, and the peer's set-up script is where the command sources it from (when shared/ lies beside us)."""
    argvs = []
    for command in (c for c in _commands() if BENCHMARK in c):
        steps = [s.strip() for s in command.split("&&")]
        source, run = steps if len(steps) == 2 else ("", steps[0])
        if source:
            assert source.startswith("source ")
            script = (ROOT / source.split(" ", 1)[1]).resolve()
            if (ROOT.parent / "shared").is_dir():
                assert script.is_file(), script
        argv = shlex.split(run)
        assert argv[:2] == ["python", BENCHMARK]
        argvs.append(argv[2:])
    assert argvs
    # One interpreter parses them all (importing the script pulls torch in: seconds per process); each command's
    # parse is a separate call, so one that fails exits 2 with the parser's message, as it would alone.
    check = ("import sys; sys.path.insert(0, '.'); from benchmarks.bench_vllm import parse_args; "
             f"[parse_args(argv) for argv in {argvs!r}]")
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def _steps() -> list[str]:
    walk = GUIDE.split("## The request path, file by file", 1)[1].split("\n## ", 1)[0]
    return re.split(r"\n(?=\d+\. )", walk[walk.index("\n1. ") + 1 :].strip())


def _defined(name: str, source: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b", source, flags=re.M) is not None


def test_request_path_walk_names_what_exists() -> None:
    """Each step's files exist, and every function or class it names is defined in one of that step's files
    (`Class.method`: both, in the same file)."""
    steps = _steps()
    titles = [m.group(1) if (m := re.match(r"\d+\. \*\*(.+?)\.\*\*", s)) else s[:40] for s in steps]
    stages = ["HTTP", "Serving pipeline", "Engine scheduler", "Runner", "Model", "Output processor", "Stream"]
    assert [t for t in titles if t in stages] == stages, titles  # the order, each once
    for step in steps:
        text = " ".join(step.split())
        files = re.findall(r"`([\w/]+\.py)`", text)
        assert files, step
        sources = {}
        for f in files:
            assert (ROOT / f).is_file(), f
            sources[f] = (ROOT / f).read_text()
        for name in re.findall(r"`([A-Za-z_]\w*(?:\.\w+)?)`", text):
            if name.endswith(".py"):
                continue
            cls, _, member = name.rpartition(".")
            ok = any((not cls or _defined(cls, src)) and _defined(member, src) for src in sources.values())
            assert ok, f"{name} is not defined in {files}"
