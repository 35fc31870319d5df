"""Typed configuration of the composition: the vision encoder, the projector and the language model.

`VLMConfig` reads from and writes to Hugging Face's `config.json`, so the checkpoints we save load in transformers and
the released ones load here. What a family's config.json holds is the family's own (model/families/): `from_hf`
finds it by the `model_type` and `to_hf` by the config's `family`, through model/registry.py. Derived values are
computed in `__post_init__`; a config is never mutated after it is built. The components' own configs live beside
it (model/vision_config.py, model/text_config.py, model/audio_config.py, model/qwen2_vision.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import registry
from .audio_config import AudioConfig
from .qwen2_vision import Qwen2VisionConfig
from .text_config import SUPPORTED_TEXT_TYPES, ConfigError, RopeConfig, TextConfig
from .vision_config import SUPPORTED_VISION_TYPES, VisionConfig

__all__ = ["SUPPORTED_TEXT_TYPES", "SUPPORTED_VISION_TYPES", "ConfigError", "ProjectorConfig", "RopeConfig",
           "TextConfig", "VLMConfig", "VisionConfig"]

ProjectorKind = Literal["linear", "mlp", "resampler", "pixel_shuffle", "avg_pool"]


@dataclass(frozen=True)
class ProjectorConfig:
    """The bridge from vision features to the LM's width: linear, MLP (LLaVA's mlp2x_gelu), Perceiver Resampler,
    pixel shuffle + Linear (Idefics3) or average pooling + norm + matrix (Gemma 3); model/projector.py builds them."""

    kind: ProjectorKind = "mlp"
    hidden_act: str = "gelu"
    bias: bool = True
    num_queries: int = 16  # resampler; avg_pool: the pooled tokens (Gemma 3's mm_tokens_per_image)
    depth: int = 2  # resampler only
    num_heads: int = 4  # resampler only
    ff_mult: int = 4  # resampler only
    scale_factor: int = 2  # pixel_shuffle only: every scale x scale patches become one token


@dataclass(frozen=True)
class VLMConfig:
    """The composition: encoder + projector + LM, and how images enter the prompt."""

    vision: VisionConfig | Qwen2VisionConfig | None  # Qwen2VisionConfig: qwen2_vl's tower; None: qwen2_audio's
    text: TextConfig
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    image_token_index: int = 32000
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    tie_word_embeddings: bool = False
    family: str = "llava"  # the composition (model/registry.py): Qwen2.5-VL's is qwen2_vl's, its tower's version 2.5
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()  # llava_next / onevision: the grid resolutions (h, w)
    vision_aspect_ratio: str | None = None  # llava_onevision: anyres_max_N
    token_ids: tuple[tuple[str, int], ...] = ()  # qwen2_vl, gemma3: their other image token ids, kept
    audio: AudioConfig | None = None  # an audio tower (qwen2_audio's own; or the `audio/` folder beside a VLM)
    num_feature_layers: int = field(init=False)
    num_visual_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(f"vision_feature_select_strategy must be 'default' or 'full', "
                              f"got {self.vision_feature_select_strategy!r}")
        self.spec.check(self)  # the family's own constraints: its tower, projector, grids, ...
        if self.vision is None:  # qwen2_audio: no vision tower, no image parts
            object.__setattr__(self, "num_feature_layers", 0)
            object.__setattr__(self, "num_visual_tokens", 0)
            return
        if isinstance(self.vision, Qwen2VisionConfig):
            object.__setattr__(self, "num_feature_layers", 1)
            object.__setattr__(self, "num_visual_tokens", 1)  # per image it varies with its size: 1 is a floor
            return
        layers = self.feature_layers
        n_states = self.vision.num_hidden_layers + 1
        for layer in layers:
            if not -n_states <= layer < n_states:
                raise ConfigError(f"vision_feature_layer {layer} out of range for {n_states} hidden states")
        object.__setattr__(self, "num_feature_layers", len(layers))
        if self.projector.kind == "resampler":
            tokens = self.projector.num_queries
        elif self.projector.kind == "avg_pool":  # gemma3: mm_tokens_per_image, a square pooled from the patches
            side, out = self.vision.image_size // self.vision.patch_size, math.isqrt(self.projector.num_queries)
            if out * out != self.projector.num_queries or side % out:
                raise ConfigError(f"mm_tokens_per_image {self.projector.num_queries} must be a square whose side "
                                  f"divides the {side} patches a side")
            tokens = self.projector.num_queries
        elif self.projector.kind == "pixel_shuffle":  # per tile (idefics3: a floor per image)
            tokens = (self.vision.image_size // self.vision.patch_size // self.projector.scale_factor) ** 2
        else:
            # LLaVA's `default` drops the first position (CLIP's class token) whatever the encoder; `full` keeps all.
            tokens = self.vision.num_positions - (1 if self.vision_feature_select_strategy == "default" else 0)
        object.__setattr__(self, "num_visual_tokens", tokens)

    @property
    def spec(self) -> registry.FamilySpec:
        """The family's spec (model/registry.py): its config.json both ways, checkpoint layout, image encoding."""
        return registry.family_spec(self.family)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        layer = self.vision_feature_layer
        return (layer,) if isinstance(layer, int) else tuple(layer)

    @property
    def vision_feature_dim(self) -> int:
        """Channels of the selected features: the encoder width times the number of selected layers."""
        return self.vision.hidden_size * self.num_feature_layers if self.vision is not None else 0

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> VLMConfig:
        """From a config.json, read by the family its `model_type` names (a ConfigError naming the supported ones
        for any other)."""
        return registry.spec_for(d.get("model_type")).from_hf(d)

    def to_hf(self) -> dict[str, Any]:
        """config.json, as the family writes it; an audio tower beside a vision one is not in it (it is
        `audio/config.json`)."""
        return self.spec.to_hf(self)

    @classmethod
    def from_file(cls, path: str | Path) -> VLMConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_hf(json.load(f))
