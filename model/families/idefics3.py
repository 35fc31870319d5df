"""Idefics3's composition (SmolVLM's too): the image split into tiles plus a global view (model/idefics3.py), each
tile through a SigLIP tower with its patches at Idefics3's bucketed positions and its post-LayerNorm, a pixel shuffle
and one Linear (model/projector.py), into a Llama LM; each image's span is its token layout (tile tags and `<image>`
slots), whose tag embeddings travel with the visual tokens.

Checkpoints: the Hub's `model.text_model.*`, `model.vision_model.*`, `model.connector.modality_projection.*` and
`lm_head.*` (transformers 5's names are the same), which we save too.
"""

from __future__ import annotations

from typing import Any

from ..config import ProjectorConfig, VLMConfig
from ..registry import FamilySpec
from ..text_config import ConfigError
from ..vision_config import VisionConfig
from .common import require_vit, text_config


def _from_hf(d: dict[str, Any]) -> VLMConfig:
    text_d = {"model_type": "llama", "rms_norm_eps": 1e-5, **dict(d.get("text_config") or {})}
    vision_d = {**dict(d.get("vision_config") or {}), "model_type": "idefics3_vision"}
    vision_d.setdefault("patch_size", 32)
    text = text_config(d, text_d)
    return VLMConfig(vision=VisionConfig.from_hf(vision_d), text=text,
                     projector=ProjectorConfig(kind="pixel_shuffle", bias=False,
                                               scale_factor=int(d.get("scale_factor", 2))),
                     image_token_index=int(d.get("image_token_id", 128257)), vision_feature_layer=-1,
                     vision_feature_select_strategy="full", tie_word_embeddings=text.tie_word_embeddings,
                     family="idefics3")


def _to_hf(config: VLMConfig) -> dict[str, Any]:
    vision = {k: v for k, v in require_vit(config).to_hf().items() if k != "vision_use_head"}
    return {"model_type": "idefics3", "architectures": [config.spec.architectures["idefics3"]],
            "vision_config": {**vision, "model_type": "idefics3_vision"}, "text_config": config.text.to_hf(),
            "image_token_id": config.image_token_index, "scale_factor": config.projector.scale_factor,
            "tie_word_embeddings": config.tie_word_embeddings}


def _check(config: VLMConfig) -> None:
    v, scale = require_vit(config), config.projector.scale_factor
    side = v.image_size // v.patch_size
    if config.projector.kind != "pixel_shuffle" or side % scale or config.feature_layers != (-1,):
        raise ConfigError(f"idefics3 needs the pixel-shuffle projector, the last layer, and {side} patches a side "
                          f"divisible by scale_factor {scale}")


IDEFICS3 = FamilySpec(
    family="idefics3",
    architectures={"idefics3": "Idefics3ForConditionalGeneration"},
    from_hf=_from_hf, to_hf=_to_hf, check=_check,
    save_rules=(("language_model.lm_head.", "lm_head."), ("language_model.", "model.text_model."),
                ("vision_tower.", "model.vision_model."),
                ("multi_modal_projector.", "model.connector.modality_projection.")),
    load_rules=((r"^model\.text_model\.", "language_model."), (r"^model\.vision_model\.", "vision_tower."),
                (r"^model\.connector\.modality_projection\.", "multi_modal_projector.")),
    encoder="split",
    features="normed_bucketed",
    dense_forward=False,  # its token layouts are the runner's
)
