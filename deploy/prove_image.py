#!/usr/bin/env python3
"""Prove the Docker image without a Docker engine: build the repository's Dockerfile, start what it starts, ask it.

No Docker engine runs on our machines and no container registry is reachable, so:

1. A base image stands in for the Dockerfile's `python:3.11-slim`: Debian's minimal system made by `debootstrap`
   from this machine's apt mirror and codename, with this machine's local CA certificates (a TLS-intercepting
   egress needs them; `PIP_CERT` points pip at them), imported with `podman import`. It is built once per machine:
   cached as a podman tag and as a tarball under the cache directory, keyed by its recipe.
2. `podman build --isolation chroot --format docker` builds the Dockerfile unchanged. Two build arguments differ from
   what a user builds with: `BASE_IMAGE` (the base above) and `PIP_EXTRA_INDEX_URL` (the Dockerfile's default is
   PyTorch's CPU wheel index; here a local index holding the CPU wheel that this machine's own pip resolves
   `torch==<the Dockerfile's version>` to, lent to the build with `-v`).
3. The image is run as a container would be, without a container runtime (`podman run` cannot start one here):
   `podman create` + `podman mount` give the image's root with a writable layer; in new network, mount and PID
   namespaces (`unshare`), with /proc, /sys, a small /dev and /dev/shm mounted, the image's ENTRYPOINT + CMD runs
   chrooted there as the image's USER (its groups, HOME), with exactly the image's ENV, in its WORKDIR.
4. Checks: `/health` and `/ready` (timed), the served model is the embedded default, SHAPES questions are answered
   right over `/v1/chat/completions`, the image's HEALTHCHECK (the Dockerfile's, read back from the image config)
   exits non-zero before ready and 0 once ready, the server runs as the image's non-root user, SIGTERM stops it
   with status 0, torch inside is a CPU build with no nvidia-* wheels, and the image is under --max-size-gb.

Prints one JSON summary (size, timings, answers, failures) and exits 1 when any check fails. Run as root, with
podman and debootstrap installed (`.ci/run` installs them): `python3 deploy/prove_image.py`. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASE_RECIPE = 1  # bump when the base image's recipe below changes: a new cache key
DEFAULT_CACHE = Path(os.environ.get("VLMSERVE_IMAGE_CACHE", "/var/cache/vlmserve-image"))
INDEX_MOUNT = "/mnt/vlmserve-torch-index"  # where the local torch index is lent inside the build
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ProofError(Exception):
    """A step that cannot go on (the build failed, a tool is missing): the proof fails with this message."""


def log(message: str) -> None:
    print(f"[prove_image] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, log_path: Path | None = None, check: bool = True,
        **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command; its output goes to log_path (the tail is in the error) or is captured."""
    if log_path is None:
        out = subprocess.run(cmd, capture_output=True, text=True, **kw)
        text = out.stdout + out.stderr
    else:
        with open(log_path, "w") as f:
            out = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, **kw)
        text = log_path.read_text(errors="replace")
    if check and out.returncode != 0:
        where = f" (log: {log_path})" if log_path else ""
        raise ProofError(f"{shlex.join(cmd[:4])} ... exited {out.returncode}{where}:\n{text[-3000:]}")
    return out


# ------------------------------------------------------------------------------------------------------ Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment line inside a continued instruction is skipped, as Docker does
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    if current.strip():
        keyword, _, rest = current.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_healthcheck(text: str) -> list[str] | None:
    """The Dockerfile's HEALTHCHECK test as the image config stores it: ["CMD-SHELL", cmd] or ["CMD", arg, ...]."""
    checks = [args for keyword, args in dockerfile_instructions(text) if keyword == "HEALTHCHECK"]
    if not checks:
        return None
    args = checks[-1]
    if args.upper() == "NONE":
        return ["NONE"]
    while args.startswith("--"):
        _, _, args = args.partition(" ")
        args = args.lstrip()
    keyword, _, command = args.partition(" ")
    if keyword.upper() != "CMD":
        raise ProofError(f"HEALTHCHECK without CMD: {args!r}")
    command = command.strip()
    if command.startswith("["):
        return ["CMD", *json.loads(command)]
    return ["CMD-SHELL", command]


def dockerfile_torch_version(text: str) -> str:
    match = re.search(r"pip install[^\n]*?\btorch==([0-9][\w.]*)", text)
    if not match:
        raise ProofError("the Dockerfile has no `pip install torch==VERSION`")
    return match.group(1)


# ------------------------------------------------------------------------------------------------------ base image


def apt_mirror_and_suite() -> tuple[str, str]:
    """This machine's Debian mirror (from its apt sources) and codename: the base is made from the same."""
    suite = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            suite = line.split("=", 1)[1].strip().strip('"')
    if not suite:
        raise ProofError("no VERSION_CODENAME in /etc/os-release: is this Debian?")
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for block in Path(path).read_text().split("\n\n"):
            fields = dict(
                (k.strip().lower(), v.strip()) for k, _, v in
                (ln.partition(":") for ln in block.splitlines() if ln.strip() and not ln.startswith("#")))
            if "deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split():
                return fields["uris"].split()[0], suite
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        with contextlib.suppress(FileNotFoundError):
            for line in Path(path).read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                    return words[1], suite
    raise ProofError(f"no apt source for {suite} found under /etc/apt")


def local_ca_files() -> list[Path]:
    return sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))


def base_image(cache: Path, mirror: str, suite: str) -> tuple[str, float, str]:
    """(tag, seconds spent, how it was had): the base is reused from podman's store, else imported from the cached
    tarball, else made with debootstrap (then cached)."""
    recipe = hashlib.sha256()
    recipe.update(f"{BASE_RECIPE} {mirror} {suite} minbase".encode())
    for ca in local_ca_files():
        recipe.update(ca.name.encode() + ca.read_bytes())
    key = recipe.hexdigest()[:12]
    tag = f"localhost/vlmserve-base:{suite}-{key}"
    start = time.monotonic()
    if run(["podman", "image", "exists", tag], check=False).returncode == 0:
        return tag, time.monotonic() - start, "podman store"
    tarball = cache / f"base-{suite}-{key}.tar"
    how = "cached tarball"
    if not tarball.exists():
        how = "debootstrap"
        if shutil.which("debootstrap") is None:
            raise ProofError("debootstrap is not installed (apt-get install debootstrap)")
        rootfs = Path(tempfile.mkdtemp(prefix="base-rootfs-", dir=cache))
        try:
            log(f"debootstrap --variant=minbase {suite} from this machine's mirror (once per machine)")
            run(["debootstrap", "--variant=minbase", suite, str(rootfs), mirror], log_path=cache / "debootstrap.log")
            for junk in [*rootfs.glob("var/cache/apt/archives/*.deb"), *rootfs.glob("var/lib/apt/lists/*_*")]:
                junk.unlink()
            # This machine's trust: its local CAs survive update-ca-certificates (when the build installs
            # ca-certificates), and the bundle serves pip before that.
            (rootfs / "usr/local/share/ca-certificates").mkdir(parents=True, exist_ok=True)
            for ca in local_ca_files():
                shutil.copy(ca, rootfs / "usr/local/share/ca-certificates" / ca.name)
            (rootfs / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
            shutil.copy("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/ca-certificates.crt")
            partial = tarball.with_suffix(".partial")
            run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."])
            partial.rename(tarball)
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
    changes = [f"ENV PATH={BASE_PATH}", "ENV LANG=C.UTF-8", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt"]
    run(["podman", "import", *[a for c in changes for a in ("--change", c)], str(tarball), tag])
    return tag, time.monotonic() - start, how


# ----------------------------------------------------------------------------------------------------- torch index


def local_torch_index(cache: Path, version: str) -> Path:
    """A PEP 503 index holding the wheel this machine's pip resolves torch==version to, which must be a CPU build."""
    index = cache / "torch-index"
    files = index / "files"
    files.mkdir(parents=True, exist_ok=True)
    wheels = sorted(files.glob(f"torch-{version}+*.whl"))
    if not wheels:
        for old in files.glob("torch-*.whl"):
            old.unlink()
        log(f"pip download torch=={version} (this machine's pip configuration)")
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", f"torch=={version}",
             "-d", str(files)])
        wheels = sorted(files.glob("torch-*.whl"))
    if len(wheels) != 1 or "+cpu" not in wheels[0].name:
        names = [w.name for w in wheels]
        for w in wheels:
            w.unlink()
        raise ProofError(f"this machine's pip resolves torch=={version} to {names}, not one CPU build: "
                         "pass --torch-index with a CPU wheel index")
    wheel = wheels[0]
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (index / "simple/torch").mkdir(parents=True, exist_ok=True)
    href = f"../../files/{urllib.parse.quote(wheel.name)}#sha256={digest}"
    (index / "simple/torch/index.html").write_text(
        f'<!DOCTYPE html><html><body>\n<a href="{href}">{wheel.name}</a>\n</body></html>\n')
    return index


# ------------------------------------------------------------------------------------------------------- the image


def build(dockerfile: Path, context: Path, tag: str, args: dict[str, str], volumes: list[str], log_path: Path) -> float:
    cmd = ["podman", "build", "--isolation", "chroot", "--format", "docker", "--layers", "-f", str(dockerfile),
           "-t", tag]
    for k, v in args.items():
        cmd += ["--build-arg", f"{k}={v}"]
    for v in volumes:
        cmd += ["-v", v]
    start = time.monotonic()
    log(f"podman build -f {dockerfile} (log: {log_path})")
    run([*cmd, str(context)], log_path=log_path)
    return time.monotonic() - start


def inspect(tag: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(run(["podman", "image", "inspect", tag]).stdout)
    return data[0]


def torch_inside(rootfs: Path) -> dict[str, Any]:
    """torch's version in the image and the nvidia-* wheels beside it."""
    versions = sorted(rootfs.glob("opt/*/.venv/lib/python3*/site-packages/torch/version.py")) + sorted(
        rootfs.glob("usr/local/lib/python3*/site-packages/torch/version.py"))
    if not versions:
        return {"torch": None, "nvidia_wheels": []}
    text = versions[0].read_text()
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    site = versions[0].parent.parent
    nvidia = sorted(p.name.split("-")[0] for p in site.glob("nvidia_*.dist-info"))
    return {"torch": match.group(1) if match else None, "nvidia_wheels": nvidia}


@contextlib.contextmanager
def container_root(tag: str, name: str, command: list[str] | None = None) -> Iterator[Path]:
    """The image's root with a writable layer, as a container gets it (`podman create` + `podman mount`; nothing
    runs: the command is only recorded, for an image without CMD)."""
    run(["podman", "rm", "-f", name], check=False)
    run(["podman", "create", "--name", name, tag, *(command or [])])
    try:
        yield Path(run(["podman", "mount", name]).stdout.strip())
    finally:
        run(["podman", "umount", name], check=False)
        run(["podman", "rm", "-f", name], check=False)


# ------------------------------------------------------------------------------------- inside the namespaces (PID 1)


def _loopback_up() -> None:
    """`ip link set lo up` in this (new) network namespace."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, siocgifflags, ifreq))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))


def _mount_container_fs(rootfs: Path) -> None:
    """What a runtime mounts (proc is mounted by unshare --mount-proc): sysfs read-only, a small /dev, /dev/shm."""
    def mount(*args: str) -> None:
        run(["mount", *args])

    mount("-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", str(rootfs / "sys"))
    dev = rootfs / "dev"
    mount("-t", "tmpfs", "-o", "nosuid,mode=755,size=65536k", "tmpfs", str(dev))
    for node in ("null", "zero", "full", "random", "urandom", "tty"):
        (dev / node).touch()
        mount("--bind", f"/dev/{node}", str(dev / node))
    (dev / "shm").mkdir()
    mount("-t", "tmpfs", "-o", "nosuid,nodev,noexec,mode=1777,size=65536k", "shm", str(dev / "shm"))
    for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        (dev / link).symlink_to(target)


def _passwd_user(rootfs: Path, user: str) -> tuple[int, int, list[int], str]:
    """(uid, gid, supplementary gids, home) of the image's USER (`name`, `uid`, `name:group`, ...), from its files."""
    name, _, group = user.partition(":")
    passwd = [ln.split(":") for ln in (rootfs / "etc/passwd").read_text().splitlines() if ln.count(":") >= 6]
    groups = [ln.split(":") for ln in (rootfs / "etc/group").read_text().splitlines() if ln.count(":") >= 3]
    entry = next((p for p in passwd if name in (p[0], p[2])), None)
    if entry is None and not name.isdigit():
        raise ProofError(f"USER {name} is not in the image's /etc/passwd")
    uid = int(entry[2]) if entry else int(name)
    gid = int(entry[3]) if entry else uid
    home = entry[5] if entry else "/"
    if group:
        g = next((g for g in groups if group in (g[0], g[2])), None)
        gid = int(g[2]) if g else int(group)
    login = entry[0] if entry else ""
    extra = sorted({int(g[2]) for g in groups if login and login in g[3].split(",")} | {gid})
    return uid, gid, extra, home


def _container_env(config: dict[str, Any], home: str) -> dict[str, str]:
    env = dict(e.split("=", 1) for e in config.get("Env") or [])
    env.setdefault("PATH", BASE_PATH)
    env.setdefault("HOSTNAME", "vlmserve-proof")
    env.setdefault("HOME", home)
    return env


def _enter(rootfs: str, workdir: str, uid: int, gid: int, groups: list[int]) -> Any:
    def preexec() -> None:
        os.chroot(rootfs)
        os.chdir(workdir)
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    return preexec


def _http(url: str, body: dict[str, Any] | None = None, timeout: float = 60) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return 0, str(e)


def shape_png(shape: str, rgb: tuple[int, int, int], size: int = 128) -> bytes:
    """A SHAPES scene as a PNG (one object in a 0.3..0.6 box on light grey, as tests/test_default_model.py draws)."""
    x0 = y0 = size * 0.3
    x1 = y1 = size * 0.6
    rows = []
    for y in range(size):
        row = bytearray(b"\x00")
        for x in range(size):
            px, py = x + 0.5, y + 0.5
            if shape == "circle":
                cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
                inside = (px - cx) ** 2 + (py - cy) ** 2 <= r * r
            elif shape == "square":
                inside = x0 <= px <= x1 and y0 <= py <= y1
            else:  # a triangle standing on its base
                t = (py - y0) / (y1 - y0)
                half = t * (x1 - x0) / 2
                inside = 0 <= t <= 1 and abs(px - (x0 + x1) / 2) <= half
            row += bytes(rgb) if inside else b"\xf0\xf0\xf0"
        rows.append(bytes(row))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
            + chunk(b"IEND", b""))


QUESTIONS = [  # (shape, colour, question, answer): the default model's SHAPES world
    ("circle", (220, 40, 40), "What color is the circle?", "red"),
    ("circle", (40, 80, 220), "What color is the circle?", "blue"),
    ("square", (40, 170, 60), "What shape is the green object?", "square"),
    ("triangle", (235, 200, 30), "How many shapes are there?", "one"),
]


def _ask(base: str, png: bytes, question: str) -> str:
    import base64

    url = "data:image/png;base64," + base64.b64encode(png).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": question}]}],
            "temperature": 0, "max_tokens": 16}
    status, text = _http(base + "/v1/chat/completions", body)
    if status != 200:
        return f"<HTTP {status}: {text[:300]}>"
    content: str = json.loads(text)["choices"][0]["message"]["content"]
    return content


def serve_inside(spec: dict[str, Any]) -> dict[str, Any]:
    """PID 1 of fresh network, mount and PID namespaces: run the container's process and check it."""
    rootfs = Path(spec["rootfs"])
    config: dict[str, Any] = spec["config"]
    result: dict[str, Any] = {"failures": []}
    fail: list[str] = result["failures"]
    _loopback_up()
    _mount_container_fs(rootfs)
    uid, gid, groups, home = _passwd_user(rootfs, config.get("User") or "root")
    env = _container_env(config, home)
    workdir = config.get("WorkingDir") or "/"
    argv = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
    ports = sorted(int(p.split("/")[0]) for p in (config.get("ExposedPorts") or {}) if p.endswith("/tcp"))
    port = ports[0] if ports else 8000
    base = f"http://127.0.0.1:{port}"
    result.update(user=config.get("User"), uid=uid, argv=argv, port=port, workdir=workdir)
    if uid == 0:
        fail.append("the image runs as root (no USER, or USER root)")
        if spec["fail_fast"]:
            return result
    enter = _enter(str(rootfs), workdir, uid, gid, groups)
    health = config.get("Healthcheck") or {}
    test = list(health.get("Test") or [])
    timeout_s = (health.get("Timeout") or 30_000_000_000) / 1e9

    def healthcheck() -> int:
        if test[:1] == ["CMD-SHELL"]:
            cmd = ["/bin/sh", "-c", test[1]]
        elif test[:1] == ["CMD"]:
            cmd = test[1:]
        else:
            return -1
        try:
            return subprocess.run(cmd, env=env, preexec_fn=enter, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            return 124
        except OSError:
            return 127

    log_path = Path(spec["server_log"])
    start = time.monotonic()
    with open(log_path, "wb") as out:
        server = subprocess.Popen(argv, env=env, preexec_fn=enter, stdout=out, stderr=subprocess.STDOUT)
    try:
        if test:
            code = healthcheck()
            result["healthcheck_exit_before_ready"] = code
            if code == 0 and _http(base + "/ready", timeout=5)[0] != 200:
                fail.append("the HEALTHCHECK exits 0 while /ready is not 200")
        ready = None
        while time.monotonic() - start < spec["ready_timeout"]:
            if server.poll() is not None:
                break
            if _http(base + "/ready", timeout=5)[0] == 200:
                ready = time.monotonic() - start
                break
            time.sleep(0.5)
        result["ready_seconds"] = None if ready is None else round(ready, 1)
        if ready is None:
            status = server.poll()
            fail.append(f"the server exited with status {status} before /ready" if status is not None
                        else f"/ready not 200 within {spec['ready_timeout']} s")
            return result
        with contextlib.suppress(OSError):
            status_lines = (rootfs / f"proc/{server.pid}/status").read_text().splitlines()  # this PID namespace's
            result["process_uid"] = int(next(ln for ln in status_lines if ln.startswith("Uid:")).split()[1])
        if result.get("process_uid") != uid:
            fail.append(f"the server runs as uid {result.get('process_uid')}, not the image's USER ({uid})")
        result["health_status"] = _http(base + "/health")[0]
        if result["health_status"] != 200:
            fail.append(f"/health answered {result['health_status']}")
        status, text = _http(base + "/v1/models")
        models = [m["id"] for m in json.loads(text)["data"]] if status == 200 else []
        result["models"] = models
        if models != ["shapes-llava"]:
            fail.append(f"/v1/models lists {models} ({status}), not the embedded default model shapes-llava")
        answers = []
        for shape, rgb, question, expected in QUESTIONS:
            answer = _ask(base, shape_png(shape, rgb), question)
            answers.append({"question": question, "image": f"{shape} {rgb}", "answer": answer, "expected": expected})
            if answer.strip().lower().rstrip(".") != expected:
                fail.append(f"{question} ({shape} {rgb}): {answer!r}, expected {expected!r}")
        result["answers"] = answers
        eager = [ln for ln in log_path.read_text(errors="replace").splitlines() if "decoding eagerly" in ln]
        if eager:
            fail.append(f"the compiled decode step failed in the image: {eager[0][:300]}")
        if not test:
            fail.append("the image has no HEALTHCHECK")
        else:
            result["healthcheck"] = test
            result["healthcheck_exit"] = healthcheck()
            if result["healthcheck_exit"] != 0:
                fail.append(f"the HEALTHCHECK exited {result['healthcheck_exit']} with /ready at 200")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                result["exit_on_sigterm"] = server.wait(spec["stop_timeout"])
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
                result["exit_on_sigterm"] = None
            if result["exit_on_sigterm"] != 0:
                fail.append(f"SIGTERM: the server exited with {result['exit_on_sigterm']} "
                            f"(None: still running after {spec['stop_timeout']} s)")
    return result


def serve_and_check(rootfs: Path, config: dict[str, Any], work: Path, ready_timeout: float,
                    fail_fast: bool) -> dict[str, Any]:
    spec = {"rootfs": str(rootfs), "config": config, "server_log": str(work / "server.log"),
            "ready_timeout": ready_timeout, "stop_timeout": 40, "fail_fast": fail_fast}
    (work / "spec.json").write_text(json.dumps(spec))
    out = work / "inside.json"
    cmd = ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private",
           f"--mount-proc={rootfs / 'proc'}", sys.executable, str(Path(__file__).resolve()), "--inside",
           str(work / "spec.json"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ready_timeout + 300)
    if not out.exists():
        raise ProofError(f"the namespaced run failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


# ------------------------------------------------------------------------------------------------------------- main


def prove(opts: argparse.Namespace) -> dict[str, Any]:
    cache: Path = opts.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "logs").mkdir(exist_ok=True)
    summary: dict[str, Any] = {"image": opts.tag, "dockerfile": str(opts.dockerfile), "failures": []}
    for tool in ("podman", "unshare", "mount"):
        if shutil.which(tool) is None:
            raise ProofError(f"{tool} is not installed (apt-get install podman debootstrap)")
    if os.geteuid() != 0:
        raise ProofError("run as root (podman build --isolation chroot, chroot, namespaces)")
    text = opts.dockerfile.read_text()
    mirror, suite = apt_mirror_and_suite()
    base, base_seconds, base_how = base_image(cache, mirror, suite)
    summary["base"] = {"image": base, "from": base_how, "seconds": round(base_seconds, 1)}
    args = {"BASE_IMAGE": base}
    volumes = []
    if opts.torch_index is None:
        index = local_torch_index(cache, dockerfile_torch_version(text))
        volumes.append(f"{index}:{INDEX_MOUNT}:ro")
        args["PIP_EXTRA_INDEX_URL"] = f"file://{INDEX_MOUNT}/simple"
        summary["torch_index"] = f"local CPU wheel index ({next((index / 'files').glob('*.whl')).name})"
    else:
        args["PIP_EXTRA_INDEX_URL"] = opts.torch_index
        summary["torch_index"] = opts.torch_index or "none (PyPI's default torch)"
    previous = run(["podman", "image", "inspect", "--format", "{{.Id}}", opts.tag], check=False).stdout.strip()
    safe = re.sub(r"[^\w.-]", "_", opts.tag)
    summary["build_seconds"] = round(build(opts.dockerfile, opts.context, opts.tag, args, volumes,
                                           cache / "logs" / f"build-{safe}.log"), 1)
    info = inspect(opts.tag)
    if previous and previous != info["Id"]:
        run(["podman", "rmi", previous], check=False)  # the tag's previous image, now untagged
    config: dict[str, Any] = dict(info["Config"])
    # Docker keeps the HEALTHCHECK in Config; podman's inspect shows it beside Config.
    config["Healthcheck"] = config.get("Healthcheck") or info.get("Healthcheck")
    summary["size_bytes"] = info["Size"]
    summary["size_gb"] = round(info["Size"] / 1e9, 2)
    summary["config"] = {k: config.get(k) for k in ("User", "WorkingDir", "Entrypoint", "Cmd", "ExposedPorts")}
    fail: list[str] = summary["failures"]
    expected_check = dockerfile_healthcheck(text)
    stored = (config.get("Healthcheck") or {}).get("Test")
    if expected_check != stored:
        fail.append(f"the image's HEALTHCHECK {stored} is not the Dockerfile's {expected_check}")
    if opts.max_size_gb and info["Size"] > opts.max_size_gb * 1e9:
        fail.append(f"the image is {summary['size_gb']} GB, over {opts.max_size_gb} GB")
    with container_root(opts.tag, f"vlmserve-proof-{safe}"[:60]) as rootfs:
        summary.update(torch_inside(rootfs))
        if opts.cpu and (not summary["torch"] or "+cpu" not in summary["torch"] or summary["nvidia_wheels"]):
            fail.append(f"not a CPU image: torch {summary['torch']}, nvidia wheels {summary['nvidia_wheels']}")
        if not opts.no_serve and not (fail and opts.fail_fast):
            with tempfile.TemporaryDirectory(prefix="serve-", dir=cache) as tmp:
                inside = serve_and_check(rootfs, config, Path(tmp), opts.ready_timeout, opts.fail_fast)
                server_log = Path(tmp) / "server.log"
                log_text = server_log.read_text(errors="replace") if server_log.exists() else ""
                (cache / "logs" / f"server-{safe}.log").write_text(log_text)
            fail.extend(inside.pop("failures"))
            summary["serve"] = inside
            if fail:
                summary["server_log_tail"] = log_text[-2000:]
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--dockerfile", type=Path, default=ROOT / "Dockerfile")
    p.add_argument("--context", type=Path, default=ROOT)
    p.add_argument("--tag", default="localhost/vlmserve:proof")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help="base image tarball, torch index, logs (default $VLMSERVE_IMAGE_CACHE or %(default)s)")
    p.add_argument("--torch-index", default=None,
                   help="PIP_EXTRA_INDEX_URL for the build (default: a local index of this machine's CPU wheel; "
                        "'' for none: PyPI's default torch, the CUDA build)")
    p.add_argument("--max-size-gb", type=float, default=2.0, help="fail over this size (0: no limit)")
    p.add_argument("--no-cpu-check", dest="cpu", action="store_false", help="allow a CUDA torch inside")
    p.add_argument("--no-serve", action="store_true", help="build and inspect only")
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--json-out", type=Path, help="also write the summary here")
    p.add_argument("--rm-image", action="store_true", help="remove the image afterwards")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed check")
    p.add_argument("--inside", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.inside:
        spec_path, out_path = opts.inside
        try:
            result = serve_inside(json.loads(Path(spec_path).read_text()))
        except Exception as e:  # a failure to set up is reported as one, not as a traceback on the floor
            result = {"failures": [f"{type(e).__name__}: {e}"]}
        Path(out_path).write_text(json.dumps(result))
        return 0
    start = time.monotonic()
    try:
        summary = prove(opts)
    except ProofError as e:
        summary = {"image": opts.tag, "dockerfile": str(opts.dockerfile), "failures": [str(e)]}
    except Exception:  # a fault of this script: still a summary, and a failed proof
        import traceback

        summary = {"image": opts.tag, "dockerfile": str(opts.dockerfile), "failures": [traceback.format_exc()]}
    finally:
        if shutil.which("podman"):
            if opts.rm_image:
                run(["podman", "rmi", "-f", opts.tag], check=False)
            run(["podman", "image", "prune", "-f"], check=False)  # untagged leftovers (caches still in use stay)
    summary["total_seconds"] = round(time.monotonic() - start, 1)
    summary["ok"] = not summary["failures"]
    text = json.dumps(summary, indent=2)
    print(text)
    if opts.json_out:
        opts.json_out.write_text(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
