"""Typed configuration for the vision encoder, the language model, the projector and their composition.

Each dataclass reads from and writes to Hugging Face's `config.json` layout (LLaVA: `model_type: llava` with a
`vision_config` and a `text_config`), so the checkpoints we save load in transformers and real LLaVA checkpoints load
here. Derived values are computed in `__post_init__`; a config is never mutated after it is built.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .anyres import parse_pinpoints
from .audio_config import AudioConfig
from .qwen2_vision import Qwen2VisionConfig
from .text_config import SUPPORTED_TEXT_TYPES, ConfigError, RopeConfig, TextConfig

__all__ = ["SUPPORTED_TEXT_TYPES", "ConfigError", "ProjectorConfig", "RopeConfig", "TextConfig", "VLMConfig",
           "VisionConfig"]

VisionFlavour = Literal["clip", "siglip"]
ProjectorKind = Literal["linear", "mlp", "resampler", "pixel_shuffle", "avg_pool"]

SUPPORTED_MODEL_TYPES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3",
                         "qwen2_audio")
# The composition: how images become tokens. Qwen2.5-VL is qwen2_vl's with its tower's `version` 2.5.
Family = Literal["llava", "llava_next", "llava_onevision", "qwen2_vl", "idefics3", "gemma3", "qwen2_audio"]
_ANYRES = ("llava_next", "llava_onevision")
# llava-v1.6's pinpoints, transformers' LlavaNextConfig default
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
_QWEN2_VL_TOKEN_IDS = ("vision_start_token_id", "vision_end_token_id", "video_token_id")
_GEMMA3_TOKEN_IDS = ("boi_token_index", "eoi_token_index")
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


@dataclass(frozen=True)
class ProjectorConfig:
    """The bridge from vision features to the LM's width: linear, MLP (LLaVA's mlp2x_gelu) or Perceiver Resampler."""

    kind: ProjectorKind = "mlp"
    hidden_act: str = "gelu"
    bias: bool = True
    num_queries: int = 16  # resampler only
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
    family: Family = "llava"
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()  # llava_next / onevision: the grid resolutions (h, w)
    vision_aspect_ratio: str | None = None  # llava_onevision: anyres_max_N
    token_ids: tuple[tuple[str, int], ...] = ()  # qwen2_vl: vision_start / vision_end / video token ids, kept
    audio: AudioConfig | None = None  # an audio tower (qwen2_audio's own; or the `audio/` folder beside a VLM)
    num_feature_layers: int = field(init=False)
    num_visual_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(f"vision_feature_select_strategy must be 'default' or 'full', "
                              f"got {self.vision_feature_select_strategy!r}")
        if self.vision is None:  # qwen2_audio: no vision tower, no image parts
            if self.audio is None or self.family != "qwen2_audio":
                raise ConfigError("a model without a vision tower needs an audio tower (model_type qwen2_audio)")
            object.__setattr__(self, "num_feature_layers", 0)
            object.__setattr__(self, "num_visual_tokens", 0)
            return
        if isinstance(self.vision, Qwen2VisionConfig):
            if self.family != "qwen2_vl" or self.text.rope.mrope_section is None:
                raise ConfigError("Qwen2-VL's vision tower goes with model_type qwen2_vl and an M-RoPE text model")
            if sum(self.text.rope.mrope_section) * 2 != self.text.head_dim:
                raise ConfigError(f"mrope_section {self.text.rope.mrope_section} must cover half the head dim "
                                  f"({self.text.head_dim // 2})")
            object.__setattr__(self, "num_feature_layers", 1)
            object.__setattr__(self, "num_visual_tokens", 1)  # per image it varies with its size: 1 is a floor
            return
        layers = self.feature_layers
        n_states = self.vision.num_hidden_layers + 1
        for layer in layers:
            if not -n_states <= layer < n_states:
                raise ConfigError(f"vision_feature_layer {layer} out of range for {n_states} hidden states")
        object.__setattr__(self, "num_feature_layers", len(layers))
        if self.family in _ANYRES:
            v = self.vision
            per_tile = v.num_positions - (1 if self.vision_feature_select_strategy == "default" else 0)
            if per_tile != (v.image_size // v.patch_size) ** 2 or self.projector.kind != "mlp":
                raise ConfigError(f"{self.family} needs the MLP projector and a feature per patch (CLIP with "
                                  "strategy 'default', SigLIP with 'full')")
            if not self.image_grid_pinpoints:
                raise ConfigError(f"{self.family} needs image_grid_pinpoints")
        if self.family == "idefics3":
            v, scale = self.vision, self.projector.scale_factor
            side = v.image_size // v.patch_size
            if self.projector.kind != "pixel_shuffle" or side % scale or self.feature_layers != (-1,):
                raise ConfigError(f"idefics3 needs the pixel-shuffle projector, the last layer, and {side} patches a "
                                  f"side divisible by scale_factor {scale}")
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
    def feature_layers(self) -> tuple[int, ...]:
        layer = self.vision_feature_layer
        return (layer,) if isinstance(layer, int) else tuple(layer)

    @property
    def vision_feature_dim(self) -> int:
        """Channels of the selected features: the encoder width times the number of selected layers."""
        return self.vision.hidden_size * self.num_feature_layers if self.vision is not None else 0

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> VLMConfig:
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported; supported model_types: {SUPPORTED_MODEL_TYPES} "
                f"(vision: {SUPPORTED_VISION_TYPES}; text: {SUPPORTED_TEXT_TYPES})"
            )
        if model_type in ("qwen2_vl", "qwen2_5_vl"):
            return cls._from_qwen2_vl(d)
        if model_type == "idefics3":
            return cls._from_idefics3(d)
        if model_type == "gemma3":
            return cls._from_gemma3(d)
        if model_type == "qwen2_audio":
            text = TextConfig.from_hf({"model_type": "qwen2", **dict(d.get("text_config") or {})})
            return cls(vision=None, text=text, audio=AudioConfig.from_hf(d), family="qwen2_audio",
                       image_token_index=-1, tie_word_embeddings=text.tie_word_embeddings)
        text_d = dict(d.get("text_config") or {})
        text_d.setdefault("model_type", "llama")
        vision_d = dict(d.get("vision_config") or {})
        vision_d.setdefault("model_type", "clip_vision_model")
        if "tie_word_embeddings" in d and "tie_word_embeddings" not in text_d:
            text_d["tie_word_embeddings"] = d["tie_word_embeddings"]
        proj = dict(d.get("vlmserve_projector") or {})
        proj_kind = proj.pop("kind", d.get("projector_type", "mlp"))
        if proj_kind not in ("linear", "mlp", "resampler"):
            raise ConfigError(f"projector_type {proj_kind!r} is not supported; supported: linear, mlp, resampler")
        layer = d.get("vision_feature_layer", -2)
        text = TextConfig.from_hf(text_d)
        pinpoints: tuple[tuple[int, int], ...] = ()
        aspect = None
        if model_type in _ANYRES:
            try:
                pinpoints = parse_pinpoints(d.get("image_grid_pinpoints", DEFAULT_PINPOINTS))
            except ValueError as e:
                raise ConfigError(str(e)) from e
        if model_type == "llava_onevision":
            aspect = str(d.get("vision_aspect_ratio", "anyres_max_9"))
            if not aspect.startswith("anyres_max_") or not aspect.removeprefix("anyres_max_").isdigit():
                raise ConfigError(f"vision_aspect_ratio {aspect!r} is not supported (anyres_max_N only)")
        return cls(
            vision=VisionConfig.from_hf(vision_d),
            text=text,
            projector=ProjectorConfig(
                kind=proj_kind,
                hidden_act=d.get("projector_hidden_act", "gelu"),
                bias=bool(d.get("multimodal_projector_bias", True)),
                **proj,
            ),
            image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
            vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            tie_word_embeddings=text.tie_word_embeddings,
            family=model_type if model_type in _ANYRES else "llava",
            image_grid_pinpoints=pinpoints,
            vision_aspect_ratio=aspect,
        )

    @classmethod
    def _from_qwen2_vl(cls, d: dict[str, Any]) -> VLMConfig:
        """Qwen2-VL: transformers 5 nests the LM under `text_config`; older configs keep it at the top level."""
        text_d = dict(d.get("text_config") or {k: v for k, v in d.items() if k != "vision_config"})
        text_d["model_type"] = f"{d['model_type']}_text"
        vision_d = {"model_type": d["model_type"], **dict(d.get("vision_config") or {})}
        if "tie_word_embeddings" in d and "tie_word_embeddings" not in text_d:
            text_d["tie_word_embeddings"] = d["tie_word_embeddings"]
        text = TextConfig.from_hf(text_d)
        return cls(vision=Qwen2VisionConfig.from_hf(vision_d), text=text,
                   image_token_index=int(d.get("image_token_id", 151655)), tie_word_embeddings=text.tie_word_embeddings,
                   family="qwen2_vl", token_ids=tuple((k, int(d[k])) for k in _QWEN2_VL_TOKEN_IDS if k in d))

    @classmethod
    def _from_idefics3(cls, d: dict[str, Any]) -> VLMConfig:
        """Idefics3 / SmolVLM: a SigLIP tower over tiles, pixel shuffle + one Linear, a Llama LM."""
        text_d = {"model_type": "llama", "rms_norm_eps": 1e-5, **dict(d.get("text_config") or {})}
        if "tie_word_embeddings" in d and "tie_word_embeddings" not in text_d:
            text_d["tie_word_embeddings"] = d["tie_word_embeddings"]
        vision_d = {**dict(d.get("vision_config") or {}), "model_type": "idefics3_vision"}
        vision_d.setdefault("patch_size", 32)
        text = TextConfig.from_hf(text_d)
        return cls(vision=VisionConfig.from_hf(vision_d), text=text,
                   projector=ProjectorConfig(kind="pixel_shuffle", bias=False,
                                             scale_factor=int(d.get("scale_factor", 2))),
                   image_token_index=int(d.get("image_token_id", 128257)), vision_feature_layer=-1,
                   vision_feature_select_strategy="full", tie_word_embeddings=text.tie_word_embeddings,
                   family="idefics3")

    @classmethod
    def _from_gemma3(cls, d: dict[str, Any]) -> VLMConfig:
        """Gemma 3: a SigLIP tower (its post-LayerNorm), 4 x 4 average pooling, a Gemma norm and one matrix, and a
        Gemma 3 LM; image tokens attend to each other both ways."""
        text_d = {**dict(d.get("text_config") or {}), "model_type": "gemma3_text"}
        if "tie_word_embeddings" in d and "tie_word_embeddings" not in text_d:
            text_d["tie_word_embeddings"] = d["tie_word_embeddings"]
        vision_d = {"model_type": "siglip_vision_model", **dict(d.get("vision_config") or {})}
        text = TextConfig.from_hf(text_d)
        return cls(vision=VisionConfig.from_hf(vision_d), text=text,
                   projector=ProjectorConfig(kind="avg_pool", bias=False,
                                             num_queries=int(d.get("mm_tokens_per_image", 256))),
                   image_token_index=int(d.get("image_token_index", d.get("image_token_id", 262_144))),
                   vision_feature_layer=-1, vision_feature_select_strategy="full",
                   tie_word_embeddings=text.tie_word_embeddings, family="gemma3",
                   token_ids=tuple((k, int(d[k])) for k in _GEMMA3_TOKEN_IDS if k in d))

    def to_hf(self) -> dict[str, Any]:
        """config.json; an audio tower beside a vision one is not in it (it is `audio/config.json`)."""
        if self.vision is None:
            assert self.audio is not None  # checked at construction
            audio = self.audio.to_hf()
            del audio["projector_type"]  # Qwen2-Audio's is always one Linear
            return {"model_type": "qwen2_audio", "architectures": ["Qwen2AudioForConditionalGeneration"],
                    "text_config": self.text.to_hf(), **audio}
        if self.family == "gemma3":
            return {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                    "vision_config": self.vision.to_hf(), "text_config": self.text.to_hf(),
                    "image_token_index": self.image_token_index, "mm_tokens_per_image": self.projector.num_queries,
                    "tie_word_embeddings": self.tie_word_embeddings, **dict(self.token_ids)}
        if self.family == "idefics3":
            vision = {k: v for k, v in self.vision.to_hf().items() if k != "vision_use_head"}
            return {"model_type": "idefics3", "architectures": ["Idefics3ForConditionalGeneration"],
                    "vision_config": {**vision, "model_type": "idefics3_vision"}, "text_config": self.text.to_hf(),
                    "image_token_id": self.image_token_index, "scale_factor": self.projector.scale_factor,
                    "tie_word_embeddings": self.tie_word_embeddings}
        if isinstance(self.vision, Qwen2VisionConfig):
            v25 = self.vision.version == "2.5"
            arch = "Qwen2_5_VLForConditionalGeneration" if v25 else "Qwen2VLForConditionalGeneration"
            return {"model_type": "qwen2_5_vl" if v25 else "qwen2_vl", "architectures": [arch],
                    "vision_config": self.vision.to_hf(), "text_config": self.text.to_hf(),
                    "image_token_id": self.image_token_index, "tie_word_embeddings": self.tie_word_embeddings,
                    **dict(self.token_ids)}
        layer = self.vision_feature_layer
        out: dict[str, Any] = {
            "model_type": "llava",
            "architectures": ["LlavaForConditionalGeneration"],
            "vision_config": self.vision.to_hf(),
            "text_config": self.text.to_hf(),
            "image_token_index": self.image_token_index,
            "image_seq_length": self.num_visual_tokens,
            "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "projector_hidden_act": self.projector.hidden_act,
            "multimodal_projector_bias": self.projector.bias,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        if self.family in _ANYRES:
            arch = {"llava_next": "LlavaNextForConditionalGeneration",
                    "llava_onevision": "LlavaOnevisionForConditionalGeneration"}[self.family]
            out.update(model_type=self.family, architectures=[arch],
                       image_grid_pinpoints=[list(p) for p in self.image_grid_pinpoints])
            del out["image_seq_length"]  # per image
            if self.vision_aspect_ratio is not None:
                out["vision_aspect_ratio"] = self.vision_aspect_ratio
        if self.projector.kind != "mlp":
            # LLaVA has no name for these projectors: our own fields, ignored by transformers.
            out["projector_type"] = self.projector.kind
            fields = asdict(self.projector)
            out["vlmserve_projector"] = {k: v for k, v in fields.items() if k not in ("hidden_act", "bias")}
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> VLMConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_hf(json.load(f))
