"""What the family files share: reading the LM's part of a config.json, and the check that a family has a ViT."""

from __future__ import annotations

from typing import Any

from ..config import VLMConfig
from ..qwen2_vision import Qwen2VisionConfig
from ..text_config import ConfigError, TextConfig
from ..vision_config import VisionConfig


def text_config(d: dict[str, Any], text_d: dict[str, Any]) -> TextConfig:
    """The LM of config.json `d` from its dict `text_d`; transformers writes `tie_word_embeddings` at either level,
    the LM's own winning."""
    if "tie_word_embeddings" in d and "tie_word_embeddings" not in text_d:
        text_d = {**text_d, "tie_word_embeddings": d["tie_word_embeddings"]}
    return TextConfig.from_hf(text_d)


def require_vit(config: VLMConfig) -> VisionConfig:
    """The config's CLIP / SigLIP tower (model/vision.py); a ConfigError for a family that needs one and has none."""
    if config.vision is None:
        raise ConfigError("a model without a vision tower needs an audio tower (model_type qwen2_audio)")
    if isinstance(config.vision, Qwen2VisionConfig):
        raise ConfigError("Qwen2-VL's vision tower goes with model_type qwen2_vl and an M-RoPE text model")
    return config.vision
