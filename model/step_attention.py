"""A serving step's paged attention as one opaque op, so that a compiled forward can go around it.

torch.compile traces the decoder layers of a decode step (norms, rotary, SwiGLU and the residual adds fuse into a few
kernels; the matmuls stay oneDNN's) but not its attention: the number of keys changes every step, and the step
writes into the KV pool. A compiled forward therefore gets `StepAttention` as its attention context, whose layers
call `vlmserve::paged_attention(q, k, v, layer, window)`; the op runs the step's `PagedBatch.attend` eagerly, on the
batch the runner has set for the step (`stepping(batch)`), as vLLM's forward context does. The op's output has its
query's shape, so the graph's only varying size is the step's number of tokens.

The op writes the KV pool, which is not among its arguments, yet is declared free of mutation. That is sound here:
the pool is never an input or output of the graph, every call's output is used (no call can be dropped), and each
layer's call is the only one that touches that layer's pool, so no two calls need an order beyond the one their data
already gives (layer l + 1 reads layer l's output).

On a CPU where our C++ kernels build, the compiled step calls `vlmserve_step::decode_attention` instead (the same
write and paged decode kernel, model/csrc/step_ops.cpp), with the step's metadata set by `stepping_native`, and its
matmuls through `vlmserve_step::packed_linear`: inductor's C++ wrapper then runs the whole step without Python.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .attention import PagedBatch

_local = threading.local()  # per engine thread: the batch its current step attends through


@contextmanager
def stepping(batch: PagedBatch) -> Iterator[None]:
    """Within the block, `vlmserve::paged_attention` attends through `batch` (in this thread)."""
    previous = getattr(_local, "batch", None)
    _local.batch = batch
    try:
        yield
    finally:
        _local.batch = previous


@torch.library.custom_op("vlmserve::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, window: int) -> torch.Tensor:
    """q (1, N, H, Dh), k/v (1, N, Hkv, Dh) -> (1, N, H, Dh) through the current step's batch; window -1: none."""
    batch: PagedBatch | None = getattr(_local, "batch", None)
    if batch is None:
        raise RuntimeError("vlmserve::paged_attention was called outside stepping(batch)")
    return batch.attend(layer, q, k, v, window=None if window < 0 else window).contiguous()


@paged_attention.register_fake
def _paged_attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, window: int
                           ) -> torch.Tensor:
    return q.new_empty(q.shape)


@contextmanager
def stepping_native(ops: Any, pools: int, batch: PagedBatch) -> Iterator[None]:
    """Within the block, `vlmserve_step::decode_attention` attends through `batch`, a decode-only step, over the KV
    pools registered under `pools` (model/csrc/step_ops.cpp; in this thread)."""
    ops.set_decode_step(pools, batch.slots, batch.decode_tables, batch.decode_lens)
    try:
        yield
    finally:
        ops.clear_decode_step()


class StepAttention:
    """The attention context of a compiled serving forward: each layer's attention is one call of the op.

    `native`: the C++ op (`vlmserve_step::decode_attention`, decode-only CPU steps under `stepping_native`) instead
    of the Python one under `stepping`: the same computation, with no Python in between."""

    def __init__(self, native: bool = False) -> None:
        self.native = native

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
               scale: float | None = None) -> torch.Tensor:
        if scale is not None:
            raise ValueError("StepAttention takes the default softmax scale only")
        w = -1 if window is None else window
        if self.native:
            return torch.ops.vlmserve_step.decode_attention(q, k, v, layer, q.shape[-1] ** -0.5, w)  # (1, N, H, Dh)
        return paged_attention(q, k, v, layer, w)  # (1, N, H, Dh)
