"""Qwen2-VL's vision tower: a ViT over an image at its own resolution, with 2-D rotary positions, and the patch merger
that makes every 2 x 2 block of patches one token of the LM's width (the merger is the projector). Qwen2.5-VL's
(`version` 2.5) has RMSNorm, a gated MLP and, except in a few blocks, attention within windows of the image.

The processor (model/images.py) cuts an image of (h, w) pixels, resized so that both sides are multiples of
patch * merge, into (h / patch) x (w / patch) patches, each flattened over (channels, temporal_patch_size, patch,
patch) and ordered block by block (the m x m patches a merged token covers lie together). The tower embeds the
patches (a Conv3d with kernel = stride, i.e. one matmul), rotates q/k by each patch's (row, column), attends within
each image, and the merger turns each run of m * m patches into one visual token. Follows transformers'
`Qwen2VisionTransformerPretrainedModel` (5.x); key names are the checkpoint's (`visual.blocks.0.attn.qkv`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .activations import activation

Grid = tuple[int, int, int]  # (t, h, w) of an image in patches, before merging


@dataclass(frozen=True)
class Qwen2VisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584  # the LM's width: what the merger outputs
    hidden_act: str = "quick_gelu"
    mlp_ratio: float = 4.0
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    rope_theta: float = 10000.0
    # Qwen2.5-VL: RMSNorm, a gated SiLU MLP of `intermediate_size`, attention within windows of `window_size` px
    # except in the `fullatt_block_indexes` blocks
    version: str = "2"  # "2" or "2.5"
    intermediate_size: int = 0
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Qwen2VisionConfig:
        rope = d.get("rope_parameters") or {}
        common = dict(depth=d.get("depth", 32), num_heads=d.get("num_heads", 16), in_channels=d.get("in_channels", 3),
                      patch_size=d.get("patch_size", 14), spatial_merge_size=d.get("spatial_merge_size", 2),
                      temporal_patch_size=d.get("temporal_patch_size", 2),
                      rope_theta=float(rope.get("rope_theta", 10000.0)))
        if d.get("model_type") in ("qwen2_5_vl", "qwen2_5_vl_vision"):  # its hidden_size is the tower's own width
            return cls(**common, version="2.5", embed_dim=d.get("hidden_size", 1280),
                       hidden_size=d.get("out_hidden_size", 3584), hidden_act=d.get("hidden_act", "silu"),
                       intermediate_size=d.get("intermediate_size", 3420), window_size=d.get("window_size", 112),
                       fullatt_block_indexes=tuple(d.get("fullatt_block_indexes", (7, 15, 23, 31))))
        return cls(**common, embed_dim=d.get("embed_dim", 1280), hidden_size=d.get("hidden_size", 3584),
                   hidden_act=d.get("hidden_act", "quick_gelu"), mlp_ratio=float(d.get("mlp_ratio", 4.0)))

    def to_hf(self) -> dict[str, Any]:
        if self.version == "2.5":
            return {"model_type": "qwen2_5_vl_vision", "depth": self.depth, "hidden_size": self.embed_dim,
                    "out_hidden_size": self.hidden_size, "hidden_act": self.hidden_act,
                    "intermediate_size": self.intermediate_size, "num_heads": self.num_heads,
                    "in_channels": self.in_channels, "patch_size": self.patch_size,
                    "spatial_merge_size": self.spatial_merge_size, "temporal_patch_size": self.temporal_patch_size,
                    "window_size": self.window_size, "fullatt_block_indexes": list(self.fullatt_block_indexes),
                    "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta}}
        return {"model_type": "qwen2_vl_vision", "depth": self.depth, "embed_dim": self.embed_dim,
                "hidden_size": self.hidden_size, "hidden_act": self.hidden_act,
                "mlp_ratio": int(self.mlp_ratio) if self.mlp_ratio == int(self.mlp_ratio) else self.mlp_ratio,
                "num_heads": self.num_heads, "in_channels": self.in_channels, "patch_size": self.patch_size,
                "spatial_merge_size": self.spatial_merge_size, "temporal_patch_size": self.temporal_patch_size,
                "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta}}

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w) an image is resized to: multiples of `factor` (patch * merge), its pixels within [min_pixels,
    max_pixels], its aspect kept as closely as that allows (transformers' `smart_resize`). ValueError past 200:1."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"a {width}x{height} image: the aspect ratio must be at most 200:1 for this model")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(pixels: np.ndarray, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """(C, H, W) normalized float32 pixels -> (H/p * W/p, C * temporal * p * p) patches, block by block (the m x m
    patches of one merged token together), the frame repeated over the temporal patch (transformers' `patchify`).

    In numpy on purpose: this runs in the preprocessing threads, and a torch copy this large would start an OpenMP
    team in each of them beside the engine's, which halves the engine's speed on two cores (benchmarks/README.md)."""
    c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal, patch, patch))  # (..., C, T, p, p)
    return torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, c * temporal * patch * patch))


def patch_positions(grid: Grid, merge: int) -> torch.Tensor:
    """(t * h * w, 2) (row, column) of each patch, in the processor's block-by-block order."""
    t, h, w = grid
    rows = torch.arange(h)[:, None].expand(h, w)  # (h, w)
    cols = torch.arange(w)[None, :].expand(h, w)  # (h, w)
    shape = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(shape).transpose(1, 2).flatten()  # (h * w,)
    cols = cols.reshape(shape).transpose(1, 2).flatten()  # (h * w,)
    return torch.stack([rows, cols], dim=-1).repeat(t, 1)  # (t * h * w, 2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PatchEmbed(nn.Module):
    def __init__(self, config: Qwen2VisionConfig) -> None:
        super().__init__()
        c, t, p = config.in_channels, config.temporal_patch_size, config.patch_size
        self.proj = nn.Conv3d(c, config.embed_dim, kernel_size=(t, p, p), stride=(t, p, p), bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # (N, C * T * P * P)
        w = self.proj.weight  # (E, C, T, P, P): a kernel the size of its stride is one matmul
        return patches.to(w.dtype) @ w.view(w.shape[0], -1).t()  # (N, E)


class VisionAttention(nn.Module):
    def __init__(self, config: Qwen2VisionConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.n_heads, self.head_dim).unbind(1)  # (N, H, Dh) each
        cos, sin = cos[:, None], sin[:, None]  # (N, 1, Dh), float32
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(x.dtype)  # rotated in float32, as transformers
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(x.dtype)
        outs = [F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1))
                for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True)]  # each image
        out = torch.cat(outs, dim=1).transpose(0, 1).reshape(n, -1)  # (N, E)
        projected: torch.Tensor = self.proj(out)  # (N, E)
        return projected


class VisionMlp(nn.Module):
    def __init__(self, config: Qwen2VisionConfig) -> None:
        super().__init__()
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.fc1 = nn.Linear(config.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, config.embed_dim)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, E)
        out: torch.Tensor = self.fc2(self.act(self.fc1(x)))  # (N, E)
        return out


class GatedMlp(nn.Module):
    """Qwen2.5-VL's: down(act(gate(x)) * up(x)), with biases."""

    def __init__(self, config: Qwen2VisionConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.embed_dim, config.intermediate_size)
        self.up_proj = nn.Linear(config.embed_dim, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.embed_dim)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, E)
        out: torch.Tensor = self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # (N, E)
        return out


class RMSNorm(nn.Module):
    """Qwen2.5-VL's norm (T5's), in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _norm(config: Qwen2VisionConfig, dim: int) -> nn.Module:
    return RMSNorm(dim) if config.version == "2.5" else nn.LayerNorm(dim, eps=1e-6)


class VisionBlock(nn.Module):
    def __init__(self, config: Qwen2VisionConfig) -> None:
        super().__init__()
        self.norm1 = _norm(config, config.embed_dim)
        self.norm2 = _norm(config, config.embed_dim)
        self.attn = VisionAttention(config)
        self.mlp: nn.Module = GatedMlp(config) if config.version == "2.5" else VisionMlp(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)  # (N, E)
        out: torch.Tensor = x + self.mlp(self.norm2(x))  # (N, E)
        return out


class PatchMerger(nn.Module):
    def __init__(self, config: Qwen2VisionConfig) -> None:
        super().__init__()
        self.width = config.embed_dim * config.spatial_merge_size**2
        self.ln_q = _norm(config, config.embed_dim)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(),
                                 nn.Linear(self.width, config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, E)
        out: torch.Tensor = self.mlp(self.ln_q(x).view(-1, self.width))  # (N / m^2, D)
        return out


class Qwen2VisionTower(nn.Module):
    """Patches of several images (side by side) and their grids -> each image's visual tokens."""

    inv_freq: torch.Tensor  # (Dh / 4,), a non-persistent buffer

    def __init__(self, config: Qwen2VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)
        half = config.head_dim // 2
        exps = torch.arange(0, half, 2, dtype=torch.int64, device="cpu").float() / half  # on the CPU, never meta
        self.register_buffer("inv_freq", 1.0 / (config.rope_theta**exps), persistent=False)  # (Dh / 4,)

    def rotary(self, grids: list[Grid]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (N, Dh) of every patch: the row's angles on the first quarter, the column's on the second,
        both repeated over the second half."""
        merge = self.config.spatial_merge_size
        pos = torch.cat([patch_positions(g, merge) for g in grids]).to(self.inv_freq.device)  # (N, 2)
        freqs = pos[..., None].float() * self.inv_freq  # (N, 2, Dh / 4)
        angles = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)  # (N, Dh / 2)
        angles = torch.cat([angles, angles], dim=-1)  # (N, Dh)
        return angles.cos(), angles.sin()

    def windows(self, grids: list[Grid]) -> tuple[torch.Tensor, list[int]]:
        """Qwen2.5-VL: the order (over merged tokens) that puts each window's tokens together, and each window's
        length in patches (transformers' `get_vision_window_index`)."""
        m = self.config.spatial_merge_size
        side = self.config.window_size // m // self.config.patch_size  # a window's side in merged tokens
        order, lengths, offset = [], [], 0
        for t, h, w in grids:
            gh, gw = h // m, w // m
            index = torch.arange(t * gh * gw).reshape(t, gh, gw)
            ph, pw = side - gh % side, side - gw % side
            padded = F.pad(index, (0, pw, 0, ph), value=-1)
            nh, nw = (gh + ph) // side, (gw + pw) // side
            blocks = padded.reshape(t, nh, side, nw, side).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, side * side)
            for block in blocks:
                kept = block[block >= 0]
                if kept.numel():
                    order.append(kept + offset)
                    lengths.append(int(kept.numel()) * m * m)
            offset += t * gh * gw
        return torch.cat(order), lengths

    def forward(self, patches: torch.Tensor, grids: list[Grid]) -> list[torch.Tensor]:  # (N, C * T * P * P)
        lengths = [h * w for t, h, w in grids for _ in range(t)]  # attention within each frame of each image
        x = self.patch_embed(patches)  # (N, E)
        cos, sin = self.rotary(grids)
        unit = self.config.spatial_merge_size**2
        order: torch.Tensor | None = None
        window_lengths = lengths
        if self.config.version == "2.5":  # patches regrouped window by window (merge units kept together)
            order, window_lengths = self.windows(grids)
            order = order.to(x.device)

            def regroup(t: torch.Tensor) -> torch.Tensor:
                return t.view(-1, unit, t.shape[-1])[order].reshape(t.shape)

            x, cos, sin = regroup(x), regroup(cos), regroup(sin)
        for i, block in enumerate(self.blocks):
            full = order is None or i in self.config.fullatt_block_indexes
            x = block(x, cos, sin, lengths if full else window_lengths)  # (N, E)
        tokens = self.merger(x)  # (N / m^2, D)
        if order is not None:
            tokens = tokens[torch.argsort(order)]  # back to the image's own order
        per_image = [t * h * w // self.config.spatial_merge_size**2 for t, h, w in grids]
        return list(tokens.split(per_image))  # each (n_i, D)
