"""The type checker sees the project as it installs: `vlmserve.*` imports resolve from the source tree (through
.typecheck/), and a wrong call across modules is an error (tests/typecheck/wrong_calls.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = "tests/typecheck/wrong_calls.py"


def _mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_links_mirror_the_package_dir_mapping() -> None:
    """.typecheck/vlmserve/ holds one relative link per top-level folder that installs as vlmserve.<name>, and
    nothing else: a folder added to the mapping without its link would be invisible to the checker."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = pyproject["tool"]["setuptools"]["package-dir"]
    links = ROOT / ".typecheck" / "vlmserve"
    assert sorted(p.name for p in links.iterdir()) == sorted(name.split(".", 1)[1] for name in mapping)
    for package, folder in mapping.items():
        link = links / package.split(".", 1)[1]
        assert link.is_symlink() and os.readlink(link) == f"../../{folder}", link
        assert link.resolve() == (ROOT / folder).resolve()
    assert "$MYPY_CONFIG_FILE_DIR/.typecheck" in pyproject["tool"]["mypy"]["mypy_path"]


def test_wrong_calls_across_modules_are_caught() -> None:
    """Exactly the lines marked `# wrong: <code>` fail, each with its code, and nothing else does: an unresolved
    import would be an error of its own and would turn the calls into Any, which nothing checks."""
    out = _mypy(FIXTURE)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = (ROOT / FIXTURE).read_text().splitlines()
    expected = {(i, m.group(1)) for i, line in enumerate(lines, 1) if (m := re.search(r"# wrong: ([a-z-]+)", line))}
    assert len(expected) == 4
    errors = [line for line in out.stdout.splitlines() if ": error: " in line]
    found = set()
    for line in errors:
        m = re.fullmatch(rf"{re.escape(FIXTURE)}:(\d+): error: .*  \[([a-z-]+)\]", line)
        assert m is not None, f"an error outside the wrong calls: {line}"
        found.add((int(m.group(1)), m.group(2)))
    assert found == expected, out.stdout
