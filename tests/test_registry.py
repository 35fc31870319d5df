"""The model registry (model/registry.py, model/families/): every model_type finds its family, an unknown one is a
clear error, each family's config.json round-trips through our config and through transformers' own config class,
and each family's checkpoint key rules invert its save rules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from transformers import (
    CONFIG_MAPPING,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3TextConfig,
    Idefics3Config,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    Qwen2_5_VLConfig,
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2Config,
    Qwen2VLConfig,
    SiglipVisionConfig,
)
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

from vlmserve.model import registry
from vlmserve.model.config import ConfigError, VLMConfig
from vlmserve.model.weights import map_checkpoint_key

# The sizes of tests/checkpoints.py's tiny checkpoints: configs only, nothing is built.
_LM: dict[str, Any] = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
_VIT: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=32, patch_size=8)
_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def _llava() -> dict[str, Any]:
    return LlavaConfig(vision_config=CLIPVisionConfig(**_VIT), text_config=LlamaConfig(**_LM), image_token_index=3,
                       vision_feature_layer=[-3, -1]).to_dict()


def _llava_next() -> dict[str, Any]:
    return LlavaNextConfig(vision_config=CLIPVisionConfig(**_VIT), text_config=LlamaConfig(**_LM), image_token_index=3,
                           image_grid_pinpoints=_PINPOINTS).to_dict()


def _llava_onevision() -> dict[str, Any]:
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_VIT, vision_use_head=False), text_config=Qwen2Config(**_LM),
        image_token_index=3, vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_grid_pinpoints=_PINPOINTS, vision_aspect_ratio="anyres_max_9", tie_word_embeddings=True).to_dict()


def _qwen2_vl_text() -> dict[str, Any]:
    return Qwen2VLTextConfig(**_LM, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "mrope_section": [2, 3, 3]}).to_dict()


def _qwen2_vl() -> dict[str, Any]:
    vision = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=64, hidden_act="quick_gelu", mlp_ratio=2,
                                 num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(vision_config=vision.to_dict(), text_config=_qwen2_vl_text(), image_token_id=3,
                         video_token_id=4, vision_start_token_id=5, vision_end_token_id=6).to_dict()


def _qwen2_5_vl() -> dict[str, Any]:
    vision = Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64,
                                    hidden_act="silu", num_heads=4, patch_size=4, spatial_merge_size=2,
                                    temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(vision_config=vision.to_dict(), text_config=_qwen2_vl_text(), image_token_id=3,
                            video_token_id=4, vision_start_token_id=5, vision_end_token_id=6).to_dict()


def _idefics3() -> dict[str, Any]:
    vision = Idefics3VisionConfig(**{**_VIT, "image_size": 24, "patch_size": 4})
    return Idefics3Config(vision_config=vision.to_dict(), text_config=LlamaConfig(**_LM).to_dict(), image_token_id=3,
                          scale_factor=2).to_dict()


def _gemma3() -> dict[str, Any]:
    vision = SiglipVisionConfig(**{**_VIT, "patch_size": 4}, vision_use_head=False)
    text = Gemma3TextConfig(
        **_LM, head_dim=16, query_pre_attn_scalar=16, sliding_window=12,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0}})
    return Gemma3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), mm_tokens_per_image=16,
                        boi_token_index=4, eoi_token_index=5, image_token_index=3).to_dict()


def _qwen2_audio() -> dict[str, Any]:
    encoder = Qwen2AudioEncoderConfig(num_mel_bins=80, encoder_layers=2, encoder_attention_heads=4,
                                      encoder_ffn_dim=64, d_model=32, max_source_positions=250)
    return Qwen2AudioConfig(audio_config=encoder.to_dict(), text_config=Qwen2Config(**_LM).to_dict(),
                            audio_token_index=7).to_dict()


# model_type -> transformers' config.json of a minimal checkpoint of it
HF_CONFIGS: dict[str, Callable[[], dict[str, Any]]] = {
    "llava": _llava, "llava_next": _llava_next, "llava_onevision": _llava_onevision, "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl, "idefics3": _idefics3, "gemma3": _gemma3, "qwen2_audio": _qwen2_audio,
}


def test_every_supported_model_type_resolves_to_its_family() -> None:
    supported = registry.supported_model_types()
    assert supported == ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3",
                         "qwen2_audio")
    for model_type in supported:
        spec = registry.spec_for(model_type)
        assert model_type in spec.model_types
        assert registry.family_spec(spec.family) is spec
    assert registry.spec_for("qwen2_5_vl") is registry.spec_for("qwen2_vl")  # one composition, two towers
    assert {s.family for s in registry.registered_families()} == {
        "llava", "llava_next", "llava_onevision", "qwen2_vl", "idefics3", "gemma3", "qwen2_audio"}


@pytest.mark.parametrize("model_type", ["idefics2", None, ["llava"], ""])
def test_an_unknown_model_type_names_the_supported_ones(model_type: object) -> None:
    with pytest.raises(ConfigError) as info:
        VLMConfig.from_hf({**_llava(), "model_type": model_type})
    message = str(info.value)
    assert message.startswith(f"model_type {model_type!r} is not supported; supported model_types: ('llava', ")
    assert all(repr(t) in message for t in registry.supported_model_types())
    assert "vision: ('clip_vision_model'" in message and "text: (" in message


def test_a_config_of_an_unregistered_family_is_refused() -> None:
    config = VLMConfig.from_hf(_llava())
    with pytest.raises(ConfigError, match=r"family 'blip2' is not registered; registered: \('llava', "):
        VLMConfig(vision=config.vision, text=config.text, family="blip2")


def test_every_family_has_a_round_trip_case() -> None:
    assert set(HF_CONFIGS) == set(registry.supported_model_types())


@pytest.mark.parametrize("model_type", sorted(HF_CONFIGS))
def test_config_round_trips_through_ours_and_transformers(model_type: str) -> None:
    config = VLMConfig.from_hf(HF_CONFIGS[model_type]())
    spec = registry.spec_for(model_type)
    assert config.spec is spec
    ours = config.to_hf()
    assert ours["model_type"] == model_type
    assert ours["architectures"] == [spec.architectures[model_type]]
    assert VLMConfig.from_hf(ours) == config
    assert VLMConfig.from_hf(ours).to_hf() == ours
    # transformers reads what we write: its config class of that model_type, back through ours, is the same config
    theirs = CONFIG_MAPPING[model_type](**ours).to_dict()
    assert VLMConfig.from_hf(theirs) == config


@pytest.mark.parametrize("model_type", sorted(HF_CONFIGS))
def test_a_familys_load_rules_invert_its_save_rules(model_type: str) -> None:
    spec = registry.spec_for(model_type)
    for ours, hub in spec.save_rules:
        suffix = "layers.0.weight" if ours.endswith(".") else ""
        assert map_checkpoint_key(hub + suffix, spec) == ours + suffix, (hub, ours)


def test_family_rules_come_before_the_shared_ones() -> None:
    """Qwen2-Audio's `multi_modal_projector` is its audio projector; LLaVA's is the vision one."""
    key = "multi_modal_projector.linear.weight"
    assert map_checkpoint_key(key, registry.spec_for("qwen2_audio")) == "audio." + key
    assert map_checkpoint_key(key, registry.spec_for("llava")) == key
    assert map_checkpoint_key("model.visual.blocks.0.attn.qkv.weight", registry.spec_for("qwen2_vl")) == (
        "visual.blocks.0.attn.qkv.weight")
    assert map_checkpoint_key("model.layers.0.mlp.up_proj.weight", registry.spec_for("qwen2_vl")) == (
        "language_model.layers.0.mlp.up_proj.weight")
