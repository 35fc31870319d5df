"""Projectors: the bridge from vision features (B, P, vision_dim) to visual tokens (B, N, llm_dim), side by side.

| kind        | tokens out      | what it is                                                    |
| ----------- | --------------- | ------------------------------------------------------------- |
| `linear`    | P (one a patch) | one Linear: fast, simple, least capacity                      |
| `mlp`       | P               | Linear -> GELU -> Linear (LLaVA-1.5's `mlp2x_gelu`)           |
| `resampler` | num_queries     | Perceiver Resampler: learnable queries cross-attend to patches |
| `pixel_shuffle` | P / scale^2 | every scale x scale patches side by side, one Linear (Idefics3) |
| `avg_pool`  | num_queries     | average pooling to a square of num_queries, a Gemma norm, one matrix (Gemma 3) |

The MLP's parameter names (`linear_1`, `linear_2`) are LLaVA's, so its checkpoints load in transformers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .activations import activation
from .config import ProjectorConfig
from .gemma3_text import GemmaRMSNorm


class LinearProjector(nn.Module):
    """A single Linear(vision_dim -> llm_dim) applied to every patch."""

    def __init__(self, *, vision_dim: int, llm_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(vision_dim, llm_dim, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, P, Dv)
        return self.linear(features)  # (B, P, D)


class VisionProjector(nn.Module):
    """The seed's MLP projector: Linear(vision_dim -> llm_dim), GELU, Linear(llm_dim -> llm_dim)."""

    def __init__(self, *, vision_dim: int, llm_dim: int, hidden_act: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, llm_dim, bias=bias)
        self.act = activation(hidden_act)
        self.linear_2 = nn.Linear(llm_dim, llm_dim, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, P, Dv)
        return self.linear_2(self.act(self.linear_1(features)))  # (B, P, D)


class PerceiverAttention(nn.Module):
    """Latents attend to [media; latents] (Flamingo): queries from the latents, keys/values from both."""

    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"resampler dim {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:  # (B, P, D), (B, Q, D)
        b, q_len, d = latents.shape
        h, dh = self.num_heads, d // self.num_heads
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents).view(b, q_len, h, dh).transpose(1, 2)  # (B, H, Q, Dh)
        kv_in = torch.cat([media, latents], dim=1)  # (B, P + Q, D)
        k, v = self.to_kv(kv_in).view(b, kv_in.shape[1], 2, h, dh).permute(2, 0, 3, 1, 4)  # (B, H, P + Q, Dh) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, Q, Dh)
        return self.to_out(out.transpose(1, 2).reshape(b, q_len, d))  # (B, Q, D)


class FeedForward(nn.Module):
    def __init__(self, *, dim: int, mult: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mult, bias=False)
        self.fc2 = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class ResamplerLayer(nn.Module):
    def __init__(self, *, dim: int, num_heads: int, ff_mult: int) -> None:
        super().__init__()
        self.attn = PerceiverAttention(dim=dim, num_heads=num_heads)
        self.ff = FeedForward(dim=dim, mult=ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(media, latents)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """A fixed number of learnable queries compress any number of patches into `num_queries` visual tokens."""

    def __init__(
        self,
        *,
        vision_dim: int,
        llm_dim: int,
        num_queries: int = 16,
        depth: int = 2,
        num_heads: int = 4,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        self.input_proj = nn.Linear(vision_dim, llm_dim)
        self.latents = nn.Parameter(torch.randn(num_queries, llm_dim) * llm_dim**-0.5)
        self.layers = nn.ModuleList(
            ResamplerLayer(dim=llm_dim, num_heads=num_heads, ff_mult=ff_mult) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(llm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, P, Dv)
        media = self.input_proj(features)  # (B, P, D)
        latents = self.latents.to(media.dtype).expand(media.shape[0], -1, -1)  # (B, Q, D)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents)  # (B, Q, D)


class PixelShuffleProjector(nn.Module):
    """Idefics3's connector: each `scale x scale` block of a square grid of patches becomes one token (its channels
    side by side, in transformers' `pixel_shuffle` order), then one Linear without bias."""

    def __init__(self, *, vision_dim: int, llm_dim: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.proj = nn.Linear(vision_dim * scale * scale, llm_dim, bias=False)

    def shuffle(self, x: torch.Tensor) -> torch.Tensor:  # (B, P, Dv), P a square
        b, p, d = x.shape
        side, s = math.isqrt(p), self.scale
        x = x.view(b, side, side // s, d * s)  # (B, H, W/s, Dv*s): s neighbours in a row side by side
        x = x.permute(0, 2, 1, 3).reshape(b, side // s, side // s, d * s * s)  # (B, W/s, H/s, Dv*s*s)
        return x.permute(0, 2, 1, 3).reshape(b, p // (s * s), d * s * s)  # (B, P/s^2, Dv*s^2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, P, Dv)
        return self.proj(self.shuffle(features))  # (B, P/s^2, D)


class AvgPoolProjector(nn.Module):
    """Gemma 3's projector: the square grid of patches average-pooled to `num_queries` tokens (a square), normed
    (Gemma's RMSNorm, 1 + weight) and multiplied by one (vision_dim, llm_dim) matrix. Names are transformers'."""

    def __init__(self, *, vision_dim: int, llm_dim: int, num_queries: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.side = math.isqrt(num_queries)
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(vision_dim, llm_dim))
        self.mm_soft_emb_norm = GemmaRMSNorm(vision_dim, eps=eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, P, Dv), P a square
        b, p, d = features.shape
        grid = math.isqrt(p)
        x = features.transpose(1, 2).reshape(b, d, grid, grid)  # (B, Dv, G, G)
        k = grid // self.side
        pooled = F.avg_pool2d(x, kernel_size=k, stride=k).flatten(2).transpose(1, 2)  # (B, Q, Dv)
        out = torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight)  # (B, Q, D)
        return out.type_as(features)


def build_projector(config: ProjectorConfig, *, vision_dim: int, llm_dim: int) -> nn.Module:
    """The projector a config names."""
    if config.kind == "linear":
        return LinearProjector(vision_dim=vision_dim, llm_dim=llm_dim, bias=config.bias)
    if config.kind == "mlp":
        return VisionProjector(vision_dim=vision_dim, llm_dim=llm_dim, hidden_act=config.hidden_act, bias=config.bias)
    if config.kind == "resampler":
        return PerceiverResampler(
            vision_dim=vision_dim,
            llm_dim=llm_dim,
            num_queries=config.num_queries,
            depth=config.depth,
            num_heads=config.num_heads,
            ff_mult=config.ff_mult,
        )
    if config.kind == "pixel_shuffle":
        return PixelShuffleProjector(vision_dim=vision_dim, llm_dim=llm_dim, scale=config.scale_factor)
    if config.kind == "avg_pool":
        return AvgPoolProjector(vision_dim=vision_dim, llm_dim=llm_dim, num_queries=config.num_queries)
    raise ValueError(f"unknown projector kind {config.kind!r}; supported: linear, mlp, resampler, pixel_shuffle, "
                     "avg_pool")
