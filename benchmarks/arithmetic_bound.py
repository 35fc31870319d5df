"""The arithmetic bound of a serving workload: its FLOPs at the GEMM rates torch reaches here, at the workload's shapes.

A LLaVA request costs: the vision tower over its patches (only the layers up to the feature layer), the projector
over the visual tokens, the LM's prefill over the prompt, and one LM pass per further generated token. Each part is
a set of matrix products whose row count is known: prefill-sized (hundreds to thousands of rows) or decode-sized
(one row per running stream). The rate torch reaches is measured for each class in this process, on this machine,
right before the servers run, at the workload's own (rows, in, out) shapes:

- prefill and encoder products: one weight at a time (they are compute-bound), the fastest of PyTorch's default
  linear and oneDNN's packed linear at a few row counts;
- decode products: a full pass over every layer's weights in turn (a decode step reads all weights once, so the
  rate includes memory traffic, as the servers' does), the fastest of the two kernels.

bound seconds = sum over parts of FLOPs / rate; bound tokens/s = completion tokens / bound seconds. Attention's
FLOPs are counted at the same rates (generous to the bound: attention runs slower than GEMMs here).

`with_kv_reads` adds what that bound leaves out and no kernel can skip: each decode step reads its keys and values
(every layer's, the whole context) from memory, at the streaming read rate measured in the same process. It is
reported beside the bound (a roofline), not in its place.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shapes:
    """The sizes of a LLaVA checkpoint that decide its FLOPs (read from its config.json)."""

    vision_hidden: int
    vision_mlp: int
    vision_layers_used: int
    patches: int  # visual tokens (CLS excluded)
    patch_dim: int  # 3 * patch * patch
    text_hidden: int
    text_mlp: int
    text_layers: int
    q_dim: int  # heads * head_dim
    kv_dim: int  # kv heads * head_dim
    vocab: int

    @classmethod
    def of(cls, ckpt: Path) -> Shapes:
        config = json.loads((ckpt / "config.json").read_text())
        v, t = config["vision_config"], config["text_config"]
        head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
        layer = config.get("vision_feature_layer", -2)
        used = v["num_hidden_layers"] + 1 + layer if layer < 0 else layer
        return cls(vision_hidden=v["hidden_size"], vision_mlp=v["intermediate_size"], vision_layers_used=used,
                   patches=(v["image_size"] // v["patch_size"]) ** 2, patch_dim=3 * v["patch_size"] ** 2,
                   text_hidden=t["hidden_size"], text_mlp=t["intermediate_size"], text_layers=t["num_hidden_layers"],
                   q_dim=t["num_attention_heads"] * head_dim, kv_dim=t.get("num_key_value_heads",
                   t["num_attention_heads"]) * head_dim, vocab=t["vocab_size"])

    def lm_products(self) -> list[tuple[int, int, int]]:
        """(in, out, times per token) of the LM's products, the head excluded."""
        d = self.text_hidden
        return [(d, self.q_dim + 2 * self.kv_dim, self.text_layers), (self.q_dim, d, self.text_layers),
                (d, 2 * self.text_mlp, self.text_layers), (self.text_mlp, d, self.text_layers)]

    def vision_products(self) -> list[tuple[int, int, int]]:
        dv = self.vision_hidden
        return [(dv, 3 * dv, self.vision_layers_used), (dv, dv, self.vision_layers_used),
                (dv, self.vision_mlp, self.vision_layers_used), (self.vision_mlp, dv, self.vision_layers_used)]


def request_flops(s: Shapes, prompt_tokens: int, completion_tokens: int) -> dict[str, float]:
    """FLOPs of one request by class: encoder (+ projector, patch embedding), prefill, decode."""
    t = s.patches + 1  # with CLS
    dv = s.vision_hidden
    encoder = sum(2 * t * i * o * n for i, o, n in s.vision_products())
    encoder += 4 * t * t * dv * s.vision_layers_used + 2 * s.patches * s.patch_dim * dv
    encoder += 2 * s.patches * (dv * s.text_hidden + s.text_hidden * s.text_hidden)  # the 2-layer MLP projector
    per_token = sum(2 * i * o * n for i, o, n in s.lm_products())
    attn = 4 * s.q_dim * s.text_layers  # per (query, key) pair: q.k and p.v
    prefill = prompt_tokens * per_token + attn * prompt_tokens * (prompt_tokens + 1) / 2 + 2 * s.text_hidden * s.vocab
    decode = 0.0
    for i in range(1, completion_tokens):  # the first token comes from the prefill
        decode += per_token + attn * (prompt_tokens + i) + 2 * s.text_hidden * s.vocab
    return {"encoder": encoder, "prefill": prefill, "decode": decode}


def _time(fn: Callable[[], Any], min_s: float = 0.3) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < min_s or n < 3:
        fn()
        n += 1
    return elapsed / n


def _kernels(weights: list[torch.Tensor]) -> dict[str, Callable[[torch.Tensor, int], torch.Tensor]]:
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
    return {
        "default": lambda x, i: F.linear(x, weights[i]),
        "onednn-packed": lambda x, i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], ""),
    }


@torch.inference_mode()
def compute_rate(products: list[tuple[int, int, int]], rows: list[int], dtype: torch.dtype) -> dict[str, Any]:
    """Best FLOP/s over kernels and row counts for a set of compute-bound products (weighted by their FLOPs)."""
    weights = [torch.randn(o, i, dtype=dtype) for i, o, _ in products]
    best: dict[str, Any] = {"gflops": 0.0}
    for name, kernel in _kernels(weights).items():
        for m in rows:
            xs = [torch.randn(m, i, dtype=dtype) for i, _, _ in products]
            flops = sum(2 * m * i * o * n for i, o, n in products)
            seconds = sum(_time(lambda j=j, k=kernel, x=xs: k(x[j], j), 0.15) * products[j][2]
                          for j in range(len(products)))
            if flops / seconds / 1e9 > best["gflops"]:
                best = {"gflops": round(flops / seconds / 1e9, 1), "kernel": name, "rows": m}
    return best


@torch.inference_mode()
def decode_rate(s: Shapes, rows: int, dtype: torch.dtype) -> dict[str, Any]:
    """FLOP/s of one decode step's products at `rows` streams, all layers' weights read in turn (memory included)."""
    weights = [torch.randn(o, i, dtype=dtype) for i, o, n in s.lm_products() for _ in range(n)]
    weights.append(torch.randn(s.vocab, s.text_hidden, dtype=dtype))
    xs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=dtype) for w in weights}
    flops = sum(2 * rows * w.numel() for w in weights)
    best: dict[str, Any] = {"gflops": 0.0}
    for name, kernel in _kernels(weights).items():
        seconds = _time(lambda k=kernel: [k(xs[w.shape[1]], j) for j, w in enumerate(weights)])
        if flops / seconds / 1e9 > best["gflops"]:
            nbytes = sum(w.numel() * w.element_size() for w in weights)
            best = {"gflops": round(flops / seconds / 1e9, 1), "kernel": name, "rows": rows,
                    "step_ms": round(seconds * 1e3, 2), "weight_gb_per_s": round(nbytes / seconds / 1e9, 1)}
    return best


@torch.inference_mode()
def read_bandwidth(nbytes: int = 256 * 2**20) -> float:
    """Bytes/s of one streaming read of a buffer far larger than the caches (a sum over it)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / _time(lambda: x.sum())


def kv_read_bytes(s: Shapes, dtype: torch.dtype, prompt_tokens: int, completion_tokens: int) -> float:
    """Bytes of keys and values one request's decode steps read (every layer's, each step its whole context)."""
    per_key = 2 * s.kv_dim * s.text_layers * torch.empty(0, dtype=dtype).element_size()
    return per_key * sum(prompt_tokens + i for i in range(1, completion_tokens))


def rates(s: Shapes, dtype: torch.dtype, prompt_tokens: int, streams: list[int]) -> dict[str, Any]:
    """The rates of every class of products of the workload (measured now, in this process), and the memory's
    streaming read rate (for the roofline figure of `bound`)."""
    vision_rows = [s.patches + 1, 8 * (s.patches + 1)]
    prefill_rows = [prompt_tokens, 2048]
    return {"encoder": compute_rate(s.vision_products(), vision_rows, dtype),
            "prefill": compute_rate(s.lm_products(), prefill_rows, dtype),
            "decode": {str(n): decode_rate(s, n, dtype) for n in streams},
            "read_gb_per_s": round(read_bandwidth() / 1e9, 1)}


def bound(s: Shapes, measured: dict[str, Any], prompt_tokens: int, completion_tokens: int, requests: int,
          streams: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Seconds and completion tokens/s of `requests` requests at the measured rates, `streams` decoding together."""
    flops = request_flops(s, prompt_tokens, completion_tokens)
    seconds = requests * (flops["encoder"] / (measured["encoder"]["gflops"] * 1e9)
                          + flops["prefill"] / (measured["prefill"]["gflops"] * 1e9)
                          + flops["decode"] / (measured["decode"][str(streams)]["gflops"] * 1e9))
    total = requests * sum(flops.values())
    out: dict[str, Any] = {"tflop": round(total / 1e12, 3), "seconds": round(seconds, 3),
                           "tok_per_s": round(requests * completion_tokens / seconds, 1),
                           "flops_share": {k: round(v / sum(flops.values()), 3) for k, v in flops.items()}}
    if "read_gb_per_s" in measured:
        # The roofline: as above, and besides each decode step reads its keys and values (the whole context, every
        # layer) at the memory's streaming rate, work whose FLOPs are few but which the bound above leaves out.
        kv = requests * kv_read_bytes(s, dtype, prompt_tokens, completion_tokens) / (measured["read_gb_per_s"] * 1e9)
        out["with_kv_reads"] = {"seconds": round(seconds + kv, 3), "kv_read_seconds": round(kv, 3),
                                "tok_per_s": round(requests * completion_tokens / (seconds + kv), 1)}
    return out
