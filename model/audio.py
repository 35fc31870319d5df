"""The audio tower: Whisper's encoder as Qwen2-Audio runs it, and its projector. Parameter names follow transformers'
`Qwen2AudioEncoder` and `Qwen2AudioMultiModalProjector`, so checkpoints load key for key.

One clip is one window of `num_frames` mel frames (model/audio_features.py pads it with silence); the positions past
the clip's valid ones are masked as keys, as transformers masks them, and the pooled positions past the clip's
`num_tokens` are dropped: a clip of `frames` valid frames gives `num_tokens(frames)` audio tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activations import activation
from .audio_config import AudioConfig, AudioEncoderConfig
from .projector import LinearProjector, VisionProjector


class AudioAttention(nn.Module):
    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads, self.head_dim = config.encoder_attention_heads, config.head_dim
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)  # Whisper's keys have no bias
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (N, T, D), (N, 1, 1, T) bool
        n, t, d = x.shape
        q = (self.q_proj(x) * self.scaling).view(n, t, self.n_heads, self.head_dim).transpose(1, 2)  # (N, H, T, Dh)
        k = self.k_proj(x).view(n, t, self.n_heads, self.head_dim).transpose(1, 2)  # (N, H, T, Dh)
        v = self.v_proj(x).view(n, t, self.n_heads, self.head_dim).transpose(1, 2)  # (N, H, T, Dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # (N, H, T, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class AudioLayer(nn.Module):
    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.self_attn = AudioAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        self.act = activation(config.activation_function)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (N, T, D)
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))  # (N, T, D)


class AudioEncoder(nn.Module):
    """(N, n_mels, num_frames) features and each clip's valid frames -> (N, num_frames / 4, D) pooled states."""

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, d)
        self.layers = nn.ModuleList(AudioLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, features: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:  # (N, M, F), (N,)
        c = self.config
        if features.shape[-1] != c.num_frames:
            raise ValueError(f"audio features have {features.shape[-1]} frames; the encoder takes {c.num_frames}")
        w = self.conv1.weight
        x = F.gelu(self.conv1(features.to(w.dtype)))  # (N, D, F)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (N, P, D), P = F / 2
        x = x + self.embed_positions.weight.to(x.dtype)  # (N, P, D)
        valid = (frames - 1) // 2 + 1  # (N,) positions after the stride-2 conv
        keys = torch.arange(x.shape[1], device=x.device)[None, :] < valid[:, None]  # (N, P)
        mask = keys[:, None, None, :]  # (N, 1, 1, P) padding keys masked
        for layer in self.layers:
            x = layer(x, mask)
        x = F.avg_pool1d(x.transpose(1, 2), kernel_size=2, stride=2).transpose(1, 2)  # (N, P / 2, D)
        return self.layer_norm(x)  # (N, P / 2, D)


class AudioTower(nn.Module):
    """Encoder + projector: features -> each clip's audio tokens in the LM's width."""

    def __init__(self, config: AudioConfig, *, llm_dim: int) -> None:
        super().__init__()
        self.config = config
        self.audio_tower = AudioEncoder(config.encoder)
        d = config.encoder.d_model
        self.multi_modal_projector: nn.Module = (
            LinearProjector(vision_dim=d, llm_dim=llm_dim) if config.projector == "linear"
            else VisionProjector(vision_dim=d, llm_dim=llm_dim))

    def forward(self, features: torch.Tensor, frames: list[int]) -> list[torch.Tensor]:  # (N, M, F)
        """Each clip's (num_tokens(frames_i), D) audio tokens."""
        lengths = torch.tensor(frames, device=features.device)  # (N,)
        states = self.multi_modal_projector(self.audio_tower(features, lengths))  # (N, P / 2, D)
        return [s[: self.config.encoder.num_tokens(f)] for s, f in zip(states, frames, strict=True)]
