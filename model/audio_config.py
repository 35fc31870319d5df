"""Typed configuration of the audio side: a Whisper-style encoder (Qwen2-Audio's `qwen2_audio_encoder`) and the
projector that brings its features to the LM's width, read from and written to transformers' `audio_config` layout.

Two places hold one: a `qwen2_audio` checkpoint's config.json (`audio_config`, `audio_token_index`; its projector is
one Linear), and the `audio/` folder beside a vision-language checkpoint (`audio/config.json`: the same fields plus
our `projector_type`), which gives a LLaVA-layout model an audio tower while transformers and vLLM still load its
vision-language part unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .text_config import ConfigError

__all__ = ["AudioConfig", "AudioEncoderConfig"]

AudioProjectorKind = Literal["linear", "mlp"]
SUPPORTED_AUDIO_TYPES = ("qwen2_audio_encoder",)


@dataclass(frozen=True)
class AudioEncoderConfig:
    """Whisper's encoder as Qwen2-Audio uses it: two convolutions (the second of stride 2), learned positions,
    pre-LayerNorm layers, then average pooling by 2 and a LayerNorm."""

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    activation_function: str = "gelu"
    max_source_positions: int = 1500
    head_dim: int = field(init=False)
    num_frames: int = field(init=False)  # the mel frames of one window: the encoder's fixed input length

    def __post_init__(self) -> None:
        if self.d_model % self.encoder_attention_heads:
            raise ConfigError(f"audio d_model {self.d_model} not divisible by {self.encoder_attention_heads} heads")
        object.__setattr__(self, "head_dim", self.d_model // self.encoder_attention_heads)
        object.__setattr__(self, "num_frames", self.max_source_positions * 2)

    def num_tokens(self, frames: int) -> int:
        """Audio tokens of a clip with `frames` valid mel frames (Qwen2-Audio's `_get_feat_extract_output_lengths`)."""
        return ((frames - 1) // 2 + 1 - 2) // 2 + 1

    @staticmethod
    def conv_length(frames: int) -> int:
        """Valid positions after the stride-2 convolution (the encoder's attention sees these)."""
        return (frames - 1) // 2 + 1

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> AudioEncoderConfig:
        model_type = d.get("model_type", "qwen2_audio_encoder")
        if model_type not in SUPPORTED_AUDIO_TYPES:
            raise ConfigError(f"audio model_type {model_type!r} is not supported; supported: {SUPPORTED_AUDIO_TYPES}")
        if d.get("scale_embedding"):
            raise ConfigError("audio scale_embedding true is not supported (Qwen2-Audio's encoder never scales)")
        return cls(num_mel_bins=int(d.get("num_mel_bins", 128)), d_model=int(d.get("d_model", 1280)),
                   encoder_layers=int(d.get("encoder_layers", 32)),
                   encoder_attention_heads=int(d.get("encoder_attention_heads", 20)),
                   encoder_ffn_dim=int(d.get("encoder_ffn_dim", 5120)),
                   activation_function=str(d.get("activation_function", "gelu")),
                   max_source_positions=int(d.get("max_source_positions", 1500)))

    def to_hf(self) -> dict[str, Any]:
        return {"model_type": "qwen2_audio_encoder", "num_mel_bins": self.num_mel_bins, "d_model": self.d_model,
                "encoder_layers": self.encoder_layers, "encoder_attention_heads": self.encoder_attention_heads,
                "encoder_ffn_dim": self.encoder_ffn_dim, "activation_function": self.activation_function,
                "max_source_positions": self.max_source_positions, "scale_embedding": False}


@dataclass(frozen=True)
class AudioConfig:
    """The audio tower, its projector and the id of its placeholder slots."""

    encoder: AudioEncoderConfig
    audio_token_index: int = 151646
    projector: AudioProjectorKind = "linear"  # Qwen2-Audio's: one Linear; `mlp`: LLaVA's Linear-GELU-Linear

    def __post_init__(self) -> None:
        if self.projector not in ("linear", "mlp"):
            raise ConfigError(f"audio projector_type {self.projector!r} is not supported; supported: linear, mlp")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> AudioConfig:
        """From a qwen2_audio config.json, or an `audio/config.json` (the same fields, maybe `projector_type`)."""
        token = d.get("audio_token_index", d.get("audio_token_id", 151646))
        return cls(encoder=AudioEncoderConfig.from_hf(dict(d.get("audio_config") or {})), audio_token_index=int(token),
                   projector=d.get("projector_type", "linear"))

    def to_hf(self) -> dict[str, Any]:
        return {"audio_config": self.encoder.to_hf(), "audio_token_index": self.audio_token_index,
                "projector_type": self.projector}
