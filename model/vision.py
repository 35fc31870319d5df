"""A ViT image encoder in the CLIP flavour (class token, pre-LayerNorm, quick-GELU) or the SigLIP flavour
(no class token, tanh-GELU; its post-LayerNorm and pooling head are not used by LLaVA).

`forward` returns the hidden states that LLaVA's feature selection needs: state 0 is the embeddings (after CLIP's
pre-LayerNorm), state i the output of layer i. Layers past the deepest requested state are never run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activations import activation
from .vision_config import VisionConfig


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        clip = config.has_class_token
        self.patch_embedding = nn.Conv2d(
            config.num_channels, d, kernel_size=config.patch_size, stride=config.patch_size, bias=not clip
        )
        if clip:
            self.class_embedding = nn.Parameter(torch.zeros(d))
        self.position_embedding = nn.Embedding(config.num_positions, d)

    def forward(self, pixel_values: torch.Tensor,  # (N, C, H, W)
                positions: torch.Tensor | None = None) -> torch.Tensor:  # (P,) position ids, Idefics3's buckets
        w = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(w.dtype))  # (N, D, H/p, W/p)
        x = patches.flatten(2).transpose(1, 2)  # (N, P, D)
        if self.config.has_class_token:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (N, 1, D)
            x = torch.cat([cls, x], dim=1)  # (N, 1 + P, D)
        if positions is not None:
            return x + self.position_embedding(positions).to(x.dtype)  # (N, P, D)
        if x.shape[1] != self.config.num_positions:
            raise ValueError(
                f"pixel_values {tuple(pixel_values.shape[-2:])} give {x.shape[1]} positions; the encoder expects "
                f"{self.config.image_size}x{self.config.image_size} images ({self.config.num_positions} positions)"
            )
        return x + self.position_embedding.weight.to(x.dtype)  # (N, T, D)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.qkv_proj = nn.Linear(d, 3 * d)  # q, k and v in one matmul (merged on load, split on save)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, D)
        n, t, d = x.shape
        qkv = self.qkv_proj(x).view(n, t, 3, self.n_heads, self.head_dim).transpose(1, 3)  # (N, H, 3, T, Dh)
        q, k, v = qkv.unbind(2)  # (N, H, T, Dh) each
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoderLayers(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))


class VisionTransformer(nn.Module):
    """The encoder. Parameter names follow transformers' CLIP/SigLIP vision models."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        if config.has_class_token:
            self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = VisionEncoderLayers(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, layers: tuple[int, ...] = (-1,),
                positions: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Hidden states (N, T, D) for each index in `layers` (negative counts from the end, -1 = last layer);
        `positions` (T,) picks each patch's position embedding (default: patch i takes position i)."""
        n_states = self.config.num_hidden_layers + 1
        wanted = [i % n_states for i in layers]
        x = self.embeddings(pixel_values, positions)  # (N, T, D)
        if self.config.has_class_token:
            x = self.pre_layrnorm(x)
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers[: max(wanted)], start=1):
            x = layer(x)
            states[i] = x
        return [states[i] for i in wanted]
