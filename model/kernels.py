"""Our C++ CPU kernels (model/csrc/), built on first use for the machine that runs them and loaded as torch ops.

Two libraries: `paged_decode.cpp` (decode attention over the paged KV pool) and `step_ops.cpp` (the C++ ops a
compiled decode step calls: the packed matmul and the layer's attention, so that no Python runs inside the step).

A kernel is compiled once per machine and source: the shared object is cached under `VLMSERVE_KERNEL_CACHE`
(default `~/.cache/vlmserve/kernels`), named by a hash of the source, the compiler flags, the torch version and the
CPU's instruction-set flags (the code is built with `-march=native`), and written atomically, so that concurrent
servers neither rebuild it nor read half a file. It needs the C++ compiler that torch.compile needs too (`CXX`, else
`c++` / `g++`); without one, or when the build fails, `paged_decode_op()` says so once and returns None, and
attention takes PyTorch's path.

Only torch's own headers and libraries are used; the kernels parallelize with `at::parallel_for`, in torch's OpenMP
team (the shared object links the `libgomp.so.1` torch has already loaded).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
_STEP_SOURCE = Path(__file__).parent / "csrc" / "step_ops.cpp"
# -O3 with the reassociation that vectorizes the float reductions, but IEEE infinities kept (no -ffast-math)
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
          "-fopenmp", "-fPIC", "-shared", "-std=c++17")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _command(cxx: str, source: Path, target: Path) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    includes = [torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [cxx, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-isystem{p}" for p in includes),
            f"-isystem{sysconfig.get_paths()['include']}", str(source), "-o", str(target),
            f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", "-ltorch"]


def build(source: Path, cache_dir: Path | None = None) -> Path:
    """The shared object of `source` for this machine, compiled unless the cache holds it."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    cache = cache_dir or Path(os.environ.get("VLMSERVE_KERNEL_CACHE", Path.home() / ".cache" / "vlmserve" / "kernels"))
    key = hashlib.sha256("\0".join([source.read_text(), *_FLAGS, torch.__version__, _cpu_flags(), cxx]).encode())
    target = cache / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=cache, suffix=".so.partial")
    os.close(fd)
    try:
        run = subprocess.run(_command(cxx, source, Path(partial)), capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed:\n{run.stderr[-4000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    log.info("built %s", target)
    return target


@functools.cache
def paged_decode_op() -> Callable[..., torch.Tensor] | None:
    """`vlmserve_kernels::paged_decode(q, k, v, tables, lens, scale, window)` (model/csrc/paged_decode.cpp), or
    None where it cannot be built (the reason logged once). `VLMSERVE_KERNELS=0` turns our kernels off."""
    if os.environ.get("VLMSERVE_KERNELS", "1") == "0":
        return None
    try:
        torch.ops.load_library(str(build(_SOURCE)))
        op: Callable[..., torch.Tensor] = torch.ops.vlmserve_kernels.paged_decode
    except Exception as e:
        log.warning("the C++ paged decode attention is not available (%s); using PyTorch's attention", e)
        return None
    return op


@functools.cache
def step_ops() -> Any | None:
    """The `vlmserve_step` ops a compiled CPU decode step calls (model/csrc/step_ops.cpp: the packed matmul and the
    decode step's attention, in C++), with their shape functions registered for torch.compile; or None where they
    cannot be built (logged once), and the step calls the Python ops instead. `VLMSERVE_KERNELS=0` turns them off."""
    if paged_decode_op() is None:  # decode_attention calls the paged decode kernel
        return None
    try:
        torch.ops.load_library(str(build(_STEP_SOURCE)))
        ops = torch.ops.vlmserve_step
    except Exception as e:
        log.warning("the C++ decode-step ops are not available (%s); the compiled step calls Python ops", e)
        return None

    torch.library.register_fake("vlmserve_step::packed_linear", _packed_linear_shape)
    torch.library.register_fake("vlmserve_step::decode_attention", _decode_attention_shape)
    return ops


def _packed_linear_shape(x: torch.Tensor, handle: int, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _decode_attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float,
                            window: int) -> torch.Tensor:
    return q.new_empty(q.shape)
