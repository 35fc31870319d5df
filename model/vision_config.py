"""Typed configuration of a ViT vision tower in the CLIP or SigLIP flavour (model/vision.py), read from and written to
transformers' `vision_config` layout. model/config.py composes it with the LM and the projector; Qwen2-VL's tower has
its own (model/qwen2_vision.py `Qwen2VisionConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .text_config import ConfigError

__all__ = ["SUPPORTED_VISION_TYPES", "VisionConfig"]

VisionFlavour = Literal["clip", "siglip"]
SUPPORTED_VISION_TYPES = ("clip_vision_model", "siglip_vision_model", "idefics3_vision")


@dataclass(frozen=True)
class VisionConfig:
    """A ViT in the CLIP flavour (class token, pre-LayerNorm, quick-GELU) or the SigLIP flavour (no class token)."""

    flavour: VisionFlavour = "clip"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    head_dim: int = field(init=False)
    num_patches: int = field(init=False)
    num_positions: int = field(init=False)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads"
            )
        patches = (self.image_size // self.patch_size) ** 2
        object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        object.__setattr__(self, "num_patches", patches)
        object.__setattr__(self, "num_positions", patches + (1 if self.flavour == "clip" else 0))

    @property
    def has_class_token(self) -> bool:
        return self.flavour == "clip"

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> VisionConfig:
        model_type = d.get("model_type", "clip_vision_model")
        if model_type not in SUPPORTED_VISION_TYPES:
            raise ConfigError(f"vision model_type {model_type!r} is not supported; supported: {SUPPORTED_VISION_TYPES}")
        siglip = model_type in ("siglip_vision_model", "idefics3_vision")  # Idefics3's: SigLIP's, tiles of any size
        return cls(
            flavour="siglip" if siglip else "clip",
            hidden_size=d.get("hidden_size", 768),
            intermediate_size=d.get("intermediate_size", 3072),
            num_hidden_layers=d.get("num_hidden_layers", 12),
            num_attention_heads=d.get("num_attention_heads", 12),
            num_channels=d.get("num_channels", 3),
            image_size=d.get("image_size", 224),
            patch_size=d.get("patch_size", 16 if siglip else 32),
            layer_norm_eps=d.get("layer_norm_eps", 1e-6 if siglip else 1e-5),
            hidden_act=d.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu"),
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "model_type": "siglip_vision_model" if self.flavour == "siglip" else "clip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_channels": self.num_channels,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            **({"vision_use_head": False} if self.flavour == "siglip" else {"projection_dim": self.hidden_size}),
        }
