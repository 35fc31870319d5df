"""Qwen2-Audio's composition: no vision tower; each clip's log-mel features through Whisper's encoder and one Linear
(model/audio.py), placed at the audio placeholder of a Qwen2 LM. Image parts are refused (no encoder entry).

Checkpoints: the Hub's `language_model.model.*`, `language_model.lm_head.*`, `audio_tower.*` and
`multi_modal_projector.*`, which we save too. Its `multi_modal_projector` is the audio projector, hence the tower
sits in the checkpoint itself rather than in the `audio/` folder that gives another family an audio tower
(model/audio_weights.py).
"""

from __future__ import annotations

from typing import Any

from ..audio_config import AudioConfig
from ..audio_weights import AUDIO_SAVE_RULES
from ..config import VLMConfig
from ..registry import FamilySpec
from ..text_config import ConfigError, TextConfig


def _from_hf(d: dict[str, Any]) -> VLMConfig:
    text = TextConfig.from_hf({"model_type": "qwen2", **dict(d.get("text_config") or {})})
    return VLMConfig(vision=None, text=text, audio=AudioConfig.from_hf(d), family="qwen2_audio",
                     image_token_index=-1, tie_word_embeddings=text.tie_word_embeddings)


def _to_hf(config: VLMConfig) -> dict[str, Any]:
    assert config.audio is not None  # checked at construction
    audio = config.audio.to_hf()
    del audio["projector_type"]  # Qwen2-Audio's is always one Linear
    return {"model_type": "qwen2_audio", "architectures": [config.spec.architectures["qwen2_audio"]],
            "text_config": config.text.to_hf(), **audio}


def _check(config: VLMConfig) -> None:
    if config.vision is not None:
        raise ConfigError("qwen2_audio has no vision tower")
    if config.audio is None:
        raise ConfigError("a model without a vision tower needs an audio tower (model_type qwen2_audio)")


QWEN2_AUDIO = FamilySpec(
    family="qwen2_audio",
    architectures={"qwen2_audio": "Qwen2AudioForConditionalGeneration"},
    from_hf=_from_hf, to_hf=_to_hf, check=_check,
    save_rules=(("language_model.lm_head.", "language_model.lm_head."), ("language_model.", "language_model.model."),
                *AUDIO_SAVE_RULES),
    load_rules=((r"^(?:model\.)?audio_tower\.", "audio.audio_tower."),
                (r"^(?:model\.)?multi_modal_projector\.", "audio.multi_modal_projector.")),
    encoder=None,
    audio_sidecar=False,
)
