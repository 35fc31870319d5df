"""Qwen2-VL's composition: the image at its own resolution through Qwen2-VL's tower, which ends in its patch merger
(model/qwen2_vision.py: there is no separate projector), into a Qwen2 LM with M-RoPE positions, (time, row, column)
for image tokens (model/mrope.py). Qwen2.5-VL (`qwen2_5_vl`) is the same composition, its tower's `version` 2.5
(RMSNorm, a gated MLP, attention within windows).

Checkpoints: the Hub's `model.*` (the LM), `lm_head.*` and `visual.*`, which we save; transformers 5's
`model.language_model.*` and `model.visual.*` load too. transformers 5 nests the LM's config under `text_config`;
older config.jsons keep it at the top level, and both read here.
"""

from __future__ import annotations

from typing import Any

from ..config import VLMConfig
from ..qwen2_vision import Qwen2VisionConfig
from ..registry import FamilySpec
from ..text_config import ConfigError
from .common import text_config

_TOKEN_IDS = ("vision_start_token_id", "vision_end_token_id", "video_token_id")  # kept through a round trip


def _from_hf(d: dict[str, Any]) -> VLMConfig:
    text_d = dict(d.get("text_config") or {k: v for k, v in d.items() if k != "vision_config"})
    text_d["model_type"] = f"{d['model_type']}_text"
    vision_d = {"model_type": d["model_type"], **dict(d.get("vision_config") or {})}
    text = text_config(d, text_d)
    return VLMConfig(vision=Qwen2VisionConfig.from_hf(vision_d), text=text,
                     image_token_index=int(d.get("image_token_id", 151655)),
                     tie_word_embeddings=text.tie_word_embeddings, family="qwen2_vl",
                     token_ids=tuple((k, int(d[k])) for k in _TOKEN_IDS if k in d))


def _to_hf(config: VLMConfig) -> dict[str, Any]:
    assert isinstance(config.vision, Qwen2VisionConfig)  # checked at construction
    model_type = "qwen2_5_vl" if config.vision.version == "2.5" else "qwen2_vl"
    return {"model_type": model_type, "architectures": [config.spec.architectures[model_type]],
            "vision_config": config.vision.to_hf(), "text_config": config.text.to_hf(),
            "image_token_id": config.image_token_index, "tie_word_embeddings": config.tie_word_embeddings,
            **dict(config.token_ids)}


def _check(config: VLMConfig) -> None:
    if config.vision is None:
        raise ConfigError("a model without a vision tower needs an audio tower (model_type qwen2_audio)")
    if not isinstance(config.vision, Qwen2VisionConfig):
        raise ConfigError("model_type qwen2_vl needs Qwen2-VL's vision tower (a Qwen2VisionConfig)")
    mrope = config.text.rope.mrope_section
    if mrope is None:
        raise ConfigError("Qwen2-VL's vision tower goes with model_type qwen2_vl and an M-RoPE text model")
    if sum(mrope) * 2 != config.text.head_dim:
        raise ConfigError(f"mrope_section {mrope} must cover half the head dim ({config.text.head_dim // 2})")


QWEN2_VL = FamilySpec(
    family="qwen2_vl",
    architectures={"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"},
    from_hf=_from_hf, to_hf=_to_hf, check=_check,
    save_rules=(("language_model.lm_head.", "lm_head."), ("language_model.", "model."), ("visual.", "visual.")),
    load_rules=((r"^(?:model\.)?visual\.", "visual."),),  # the LM's bare `model.*`: the shared catch-all
    encoder="patches",
)
