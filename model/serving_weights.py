"""The weights laid out for serving: in the memory layout the device multiplies fastest.

Training and saving use the modules as loaded (q/k/v and gate/up are already one matmul each, from load on:
model/weights.py); a model that only serves can trade its plain layout for speed. On a CPU (a GPU keeps PyTorch's
(out, in) layout, which cuBLAS reads at full speed either way):
  - `packed`: the weight is reordered once into oneDNN's blocked format and multiplied by oneDNN's kernels, as
    inductor's freezing and IPEX do. From 4 rows up it is the fastest: 1.8x PyTorch's default at a batch-16 decode
    step, 1.1-1.3x at prefill sizes.
  - `input-major`: the weight keeps its (out, in) shape but lies in memory as (in, out). At one or two rows (a decode
    step of a single sequence) it is the fastest: 1.65x the default, 1.2x `packed`.
  - `auto` picks `packed` for an engine that batches more than two sequences and `input-major` otherwise (in
    bfloat16, `packed` always: there it is the fastest at every size).
  Figures: one core of the AVX-512 EPYC in benchmarks/README.md, 1536 x 512 fp32 weights read from memory, not cache
  (a 1-row GEMV: 311 us default, 188 input-major, 227 packed; 16 rows: 593, 569, 312 us).

Everything stays float-for-float the same computation up to rounding (logits move by ~1e-5 in float32). The change is
one-way: packed modules replace the originals and carry no `weight` to save or train, so call it on a model that
serves (the engine does, once, when it starts), not on one that trains or saves. It is idempotent.
"""

from __future__ import annotations

import functools
import itertools
import logging
import weakref
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .vlm import VisionLanguageModel

log = logging.getLogger(__name__)

Layout = Literal["auto", "standard", "input-major", "packed"]
LAYOUTS: tuple[str, ...] = ("auto", "standard", "input-major", "packed")


# Packed weights are opaque MKLDNN tensors, which torch.compile cannot trace; the matmul is therefore a custom op
# that takes a handle to the weight, so that compiled code calls it as an opaque kernel and fuses the rest around it.
_PACKED: dict[int, torch.Tensor] = {}
_handles = itertools.count()


@torch.library.custom_op("vlmserve::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) times the packed weight `handle`, plus bias: (..., out_features)."""
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED[handle], bias, "none", [], "")


@packed_linear.register_fake
def _packed_linear_shape(x: torch.Tensor, handle: int, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


class PackedLinear(nn.Module):
    """A Linear whose weight is held in oneDNN's blocked format and multiplied by oneDNN (CPU only, inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()  # (out, in)
        # Neither parameter nor buffer: an opaque MKLDNN tensor that cannot be saved, moved or trained. It lives in
        # the handle table for as long as this module does.
        self.handle = next(_handles)
        _PACKED[self.handle] = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
        weakref.finalize(self, _PACKED.pop, self.handle, None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.native = False  # registered with the C++ step ops (use_native_ops): compiled code calls those

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in)
        if torch.compiler.is_compiling():
            if self.native:  # the C++ op: no Python between a compiled step's kernels (model/csrc/step_ops.cpp)
                return torch.ops.vlmserve_step.packed_linear(x, self.handle, self.out_features, self.bias)
            return packed_linear(x, self.handle, self.out_features, self.bias)  # (..., out)
        # Eagerly, the op itself: the custom op's dispatch would add ~7 us a call.
        return torch.ops.mkldnn._linear_pointwise(x, _PACKED[self.handle], self.bias, "none", [], "")  # (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def use_native_ops(module: nn.Module, ops: Any) -> int:
    """Register the packed weights under `module` with the C++ step ops (`model.kernels.step_ops()`), so that
    compiled code multiplies by them through `vlmserve_step::packed_linear`; return how many were registered."""
    count = 0
    for child in module.modules():
        if isinstance(child, PackedLinear) and not child.native:
            ops.register_packed(child.handle, _PACKED[child.handle])
            weakref.finalize(child, ops.release_packed, child.handle).atexit = False
            child.native = True
            count += 1
    return count


def store_input_major(linear: nn.Linear) -> None:
    """Keep the weight's (out, in) shape but lay it out in memory as (in, out), contiguous."""
    w = linear.weight.detach()  # (out, in)
    if w.shape[0] > 1 and w.stride() == (1, w.shape[0]):
        return
    linear.weight = nn.Parameter(w.t().contiguous().t(), requires_grad=False)  # (out, in), strides (1, out)


@functools.cache
def packing_works(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build packs and multiplies `dtype` weights with oneDNN, and gets the right numbers."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        probe = nn.Linear(64, 48, dtype=dtype).requires_grad_(False)
        probe.weight.copy_(torch.randn(48, 64, generator=gen))
        x = torch.randn(3, 5, 64, generator=gen).to(dtype)  # (B, T, in)
        got, want = PackedLinear(probe)(x).float(), F.linear(x, probe.weight, probe.bias).float()
    except (RuntimeError, NotImplementedError) as e:
        log.info("oneDNN weight packing unavailable (%s); using the input-major layout", e)
        return False
    tolerance = 1e-3 if dtype == torch.float32 else 0.1
    return bool((got - want).abs().max() <= tolerance * want.abs().max())


def resolve_layout(layout: Layout, device: torch.device, dtype: torch.dtype, max_batch: int) -> str:
    """The layout `auto` (or a CPU layout asked for on another device) comes to here."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if device.type != "cpu":
        return "standard"
    if layout == "auto":
        # In bfloat16, oneDNN's packed kernels win at every batch size (1 row: 119 us vs 188 input-major, 211
        # default); in float32, input-major wins at 1-2 rows.
        layout = "packed" if max_batch > 2 or dtype != torch.float32 else "input-major"
    if layout == "packed" and not packing_works(dtype):
        return "input-major"
    return layout


def _relayout(module: nn.Module, layout: str, skip: nn.Linear | None = None) -> None:
    for name, child in module.named_children():
        if child is skip:
            continue
        if isinstance(child, nn.Linear):
            if layout == "packed":
                setattr(module, name, PackedLinear(child))
            elif layout == "input-major":
                store_input_major(child)
        else:
            _relayout(child, layout, skip)


def prepare_for_serving(model: VisionLanguageModel, *, layout: Layout = "auto", max_batch: int = 16) -> str:
    """Lay every Linear out for the device; return the layout applied.

    `max_batch`: the most sequences decoded together (what `auto` decides by). A tied output head keeps its
    weight shared with the embedding table, laid out as it is. On a CPU the vision encoder and the projector are
    packed whatever the language model's layout (they multiply many rows at once), unless `standard` was asked for.
    """
    lm = model.language_model
    device, dtype = lm.embed_tokens.weight.device, lm.embed_tokens.weight.dtype
    chosen = resolve_layout(layout, device, dtype, max_batch)
    tied = lm.lm_head.weight is lm.embed_tokens.weight if isinstance(lm.lm_head, nn.Linear) else False
    _relayout(lm, chosen, skip=lm.lm_head if tied else None)
    if chosen != "standard" and packing_works(dtype):
        # Images arrive many patches at a time: the encoder and projector multiply tens to thousands of rows, where
        # packed weights are the fastest whatever the decode batch.
        for name in ("vision_tower", "multi_modal_projector", "visual", "audio"):  # `visual`: Qwen2-VL's tower
            if isinstance(part := getattr(model, name, None), nn.Module):
                _relayout(part, "packed")
    log.info("weights laid out for serving: %s (%s, %s)", chosen, device.type, str(dtype).removeprefix("torch."))
    return chosen
