"""Gemma 3's composition: one view through a SigLIP tower (its post-LayerNorm), 4 x 4 average pooling, a Gemma norm
and one matrix (model/projector.py `avg_pool`), into Gemma 3's LM (model/gemma3_text.py); in prefill an image's
tokens attend to each other both ways, so its images go through the engine, which passes their spans.

Checkpoints: the Hub's names are LLaVA's classic ones (`language_model.model.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`), which we save; transformers 5's `model.*` names load through the shared rules.
"""

from __future__ import annotations

from typing import Any

from ..config import ProjectorConfig, VLMConfig
from ..registry import FamilySpec
from ..vision_config import VisionConfig
from .common import require_vit, text_config
from .llava import LLAVA_SAVE_RULES

_TOKEN_IDS = ("boi_token_index", "eoi_token_index")  # kept through a round trip


def _from_hf(d: dict[str, Any]) -> VLMConfig:
    text_d = {**dict(d.get("text_config") or {}), "model_type": "gemma3_text"}
    vision_d = {"model_type": "siglip_vision_model", **dict(d.get("vision_config") or {})}
    text = text_config(d, text_d)
    return VLMConfig(vision=VisionConfig.from_hf(vision_d), text=text,
                     projector=ProjectorConfig(kind="avg_pool", bias=False,
                                               num_queries=int(d.get("mm_tokens_per_image", 256))),
                     image_token_index=int(d.get("image_token_index", d.get("image_token_id", 262_144))),
                     vision_feature_layer=-1, vision_feature_select_strategy="full",
                     tie_word_embeddings=text.tie_word_embeddings, family="gemma3",
                     token_ids=tuple((k, int(d[k])) for k in _TOKEN_IDS if k in d))


def _to_hf(config: VLMConfig) -> dict[str, Any]:
    return {"model_type": "gemma3", "architectures": [config.spec.architectures["gemma3"]],
            "vision_config": require_vit(config).to_hf(), "text_config": config.text.to_hf(),
            "image_token_index": config.image_token_index, "mm_tokens_per_image": config.projector.num_queries,
            "tie_word_embeddings": config.tie_word_embeddings, **dict(config.token_ids)}


def _check(config: VLMConfig) -> None:
    require_vit(config)


GEMMA3 = FamilySpec(
    family="gemma3",
    architectures={"gemma3": "Gemma3ForConditionalGeneration"},
    from_hf=_from_hf, to_hf=_to_hf, check=_check,
    save_rules=LLAVA_SAVE_RULES,
    features="normed",
    bidirectional_images=True,
    dense_forward=False,  # its attention masks are the runner's
)
