"""LLaVA's composition: a CLIP or SigLIP tower (model/vision.py), the selected layers' features (the class token
dropped by `default`), a projector (LLaVA's MLP, or our linear and Perceiver Resampler: model/projector.py) and a
Llama-family LM (model/text.py). Three model_types share it:

- `llava` (llava-1.5, llava-interleave): one encoder-sized view of the image;
- `llava_next` (llava-v1.6): anyres, the whole image as one tile then a grid of tiles chosen from
  `image_grid_pinpoints`, unpadded, a newline embedding after each row (model/anyres.py);
- `llava_onevision`: LLaVA-NeXT's anyres with the grid's features shrunk past `vision_aspect_ratio` (anyres_max_N)
  and a lone base tile padded to a square.

Checkpoints: the Hub's classic names (`language_model.model.*`, `language_model.lm_head.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`, `image_newline`), which we save and every transformers
release loads; transformers 5's in-memory names load through the shared rules (model/weights.py). Projectors that
LLaVA has no name for are our own config.json fields (`projector_type`, `vlmserve_projector`), which transformers
ignores.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ..anyres import Anyres, parse_pinpoints
from ..config import ProjectorConfig, VLMConfig
from ..registry import FamilySpec, KeyRules
from ..text_config import ConfigError
from ..vision_config import VisionConfig
from .common import require_vit, text_config

# our prefix -> the Hub's: LLaVA's classic layout (Gemma 3 saves under it too)
LLAVA_SAVE_RULES: KeyRules = (
    ("language_model.lm_head.", "language_model.lm_head."),
    ("language_model.", "language_model.model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("image_newline", "image_newline"),
)
# llava-v1.6's pinpoints, transformers' LlavaNextConfig default
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
_PROJECTORS = ("linear", "mlp", "resampler")


def _from_hf(d: dict[str, Any]) -> VLMConfig:
    model_type = str(d["model_type"])
    text_d = {"model_type": "llama", **dict(d.get("text_config") or {})}
    vision_d = {"model_type": "clip_vision_model", **dict(d.get("vision_config") or {})}
    proj = dict(d.get("vlmserve_projector") or {})
    proj_kind = proj.pop("kind", d.get("projector_type", "mlp"))
    if proj_kind not in _PROJECTORS:
        raise ConfigError(f"projector_type {proj_kind!r} is not supported; supported: {', '.join(_PROJECTORS)}")
    layer = d.get("vision_feature_layer", -2)
    text = text_config(d, text_d)
    pinpoints: tuple[tuple[int, int], ...] = ()
    if model_type != "llava":  # the anyres pair
        try:
            pinpoints = parse_pinpoints(d.get("image_grid_pinpoints", DEFAULT_PINPOINTS))
        except ValueError as e:
            raise ConfigError(str(e)) from e
    aspect = None
    if model_type == "llava_onevision":
        aspect = str(d.get("vision_aspect_ratio", "anyres_max_9"))
        if not aspect.startswith("anyres_max_") or not aspect.removeprefix("anyres_max_").isdigit():
            raise ConfigError(f"vision_aspect_ratio {aspect!r} is not supported (anyres_max_N only)")
    return VLMConfig(
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
        family=model_type,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=aspect,
    )


def _to_hf(config: VLMConfig) -> dict[str, Any]:
    vision = require_vit(config)
    layer = config.vision_feature_layer
    out: dict[str, Any] = {
        "model_type": config.family,
        "architectures": [config.spec.architectures[config.family]],
        "vision_config": vision.to_hf(),
        "text_config": config.text.to_hf(),
        "image_token_index": config.image_token_index,
        "image_seq_length": config.num_visual_tokens,
        "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "projector_hidden_act": config.projector.hidden_act,
        "multimodal_projector_bias": config.projector.bias,
        "tie_word_embeddings": config.tie_word_embeddings,
    }
    if config.spec.anyres is not None:
        out["image_grid_pinpoints"] = [list(p) for p in config.image_grid_pinpoints]
        del out["image_seq_length"]  # per image
        if config.vision_aspect_ratio is not None:
            out["vision_aspect_ratio"] = config.vision_aspect_ratio
    if config.projector.kind != "mlp":
        # LLaVA has no name for these projectors: our own fields, ignored by transformers.
        out["projector_type"] = config.projector.kind
        fields = asdict(config.projector)
        out["vlmserve_projector"] = {k: v for k, v in fields.items() if k not in ("hidden_act", "bias")}
    return out


def _check(config: VLMConfig) -> None:
    require_vit(config)


def _check_anyres(config: VLMConfig) -> None:
    v = require_vit(config)
    per_tile = v.num_positions - (1 if config.vision_feature_select_strategy == "default" else 0)
    if per_tile != (v.image_size // v.patch_size) ** 2 or config.projector.kind != "mlp":
        raise ConfigError(f"{config.family} needs the MLP projector and a feature per patch (CLIP with "
                          "strategy 'default', SigLIP with 'full')")
    if not config.image_grid_pinpoints:
        raise ConfigError(f"{config.family} needs image_grid_pinpoints")


def _anyres(config: VLMConfig) -> Anyres:
    """The checkpoint's tiling: its pinpoints over tiles of the tower's size; OneVision's anyres_max_N and padded
    lone base tile."""
    v = require_vit(config)
    aspect = config.vision_aspect_ratio
    return Anyres(config.image_grid_pinpoints, v.image_size, v.image_size // v.patch_size,
                  max_tiles=int(aspect.removeprefix("anyres_max_")) if aspect else None,
                  pad_square_base=config.family == "llava_onevision")


LLAVA = FamilySpec(family="llava", architectures={"llava": "LlavaForConditionalGeneration"}, from_hf=_from_hf,
                   to_hf=_to_hf, check=_check, save_rules=LLAVA_SAVE_RULES, compile_encoder=True)
LLAVA_NEXT = FamilySpec(family="llava_next", architectures={"llava_next": "LlavaNextForConditionalGeneration"},
                        from_hf=_from_hf, to_hf=_to_hf, check=_check_anyres, save_rules=LLAVA_SAVE_RULES,
                        encoder="tiled", anyres=_anyres)
LLAVA_ONEVISION = FamilySpec(family="llava_onevision",
                             architectures={"llava_onevision": "LlavaOnevisionForConditionalGeneration"},
                             from_hf=_from_hf, to_hf=_to_hf, check=_check_anyres, save_rules=LLAVA_SAVE_RULES,
                             encoder="tiled", anyres=_anyres)
