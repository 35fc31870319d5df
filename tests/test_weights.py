"""Loading and saving LLaVA-format checkpoints: layouts, shards, dtypes, round trips and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from vlmserve.model.config import ConfigError, ProjectorConfig, VLMConfig
from vlmserve.model.vlm import VisionLanguageModel
from vlmserve.model.weights import CheckpointError, load_model, map_checkpoint_key, save_model


def _inputs(model: VisionLanguageModel) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    cfg = model.config
    n = cfg.num_visual_tokens
    ids = torch.cat([torch.full((2, n), cfg.image_token_index), torch.randint(4, 200, (2, 9))], dim=1)
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    return ids, pixels


@torch.no_grad()
def test_save_load_round_trip_is_exact(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = load_model(tiny_checkpoint)
    save_model(model, tmp_path / "saved", copy_from=tiny_checkpoint)
    again = load_model(tmp_path / "saved")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids, pixels = _inputs(model)
    assert torch.equal(model(ids, pixel_values=pixels), again(ids, pixel_values=pixels))
    assert (tmp_path / "saved" / "tokenizer.json").is_file()


@torch.no_grad()
def test_transformers_loads_what_we_save(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = load_model(tiny_checkpoint)
    save_model(model, tmp_path / "saved", copy_from=tiny_checkpoint)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    ids, pixels = _inputs(model)
    expected = hf(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(model(ids, pixel_values=pixels), expected, rtol=1e-4, atol=2e-4)  # float32 rounding


@torch.no_grad()
def test_sharded_checkpoint_loads(clip_llama: Path, tmp_path: Path) -> None:
    model = load_model(clip_llama)
    save_model(model, tmp_path / "sharded", max_shard_bytes=100_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    again = load_model(tmp_path / "sharded")
    ids, pixels = _inputs(model)
    assert torch.equal(model(ids, pixel_values=pixels), again(ids, pixel_values=pixels))


@torch.no_grad()
def test_new_key_layout_loads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """transformers 5's in-memory names (model.language_model.*, lm_head.*, model.vision_tower.*)."""
    target = tmp_path / "new"
    shutil.copytree(tiny_checkpoint, target)
    tensors = load_file(str(target / "model.safetensors"))
    renamed = {}
    for key, t in tensors.items():
        key = key.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head", "lm_head")
        key = key.replace("vision_tower.vision_model.", "vision_tower.")
        key = key if key.startswith(("model.", "lm_head")) else "model." + key
        renamed[key] = t
    assert any(k.startswith("model.vision_tower.") for k in renamed)
    save_file(renamed, str(target / "model.safetensors"))
    a, b = load_model(tiny_checkpoint), load_model(target)
    ids, pixels = _inputs(a)
    assert torch.equal(a(ids, pixel_values=pixels), b(ids, pixel_values=pixels))


def test_key_mapping_covers_both_layouts() -> None:
    cases = {
        "language_model.model.layers.0.mlp.up_proj.weight": "language_model.layers.0.mlp.up_proj.weight",
        "model.language_model.norm.weight": "language_model.norm.weight",
        "language_model.lm_head.weight": "language_model.lm_head.weight",
        "lm_head.weight": "language_model.lm_head.weight",
        "vision_tower.vision_model.embeddings.class_embedding": "vision_tower.embeddings.class_embedding",
        "model.vision_tower.encoder.layers.1.mlp.fc1.bias": "vision_tower.encoder.layers.1.mlp.fc1.bias",
        "model.multi_modal_projector.linear_1.weight": "multi_modal_projector.linear_1.weight",
        "vision_tower.vision_model.head.mlp.fc1.weight": None,
        "vision_tower.vision_model.embeddings.position_ids": None,
    }
    for key, ours in cases.items():
        assert map_checkpoint_key(key) == ours, key


@torch.no_grad()
def test_bfloat16_load(clip_llama: Path) -> None:
    f32 = load_model(clip_llama)
    bf16 = load_model(clip_llama, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    ids, pixels = _inputs(f32)
    a, b = f32(ids, pixel_values=pixels), bf16(ids, pixel_values=pixels).float()
    assert torch.isfinite(b).all()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.99


def test_load_builds_on_meta_without_random_init(clip_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No randomly initialised copy is allocated: parameter init only ever runs on the meta device."""
    seen: list[torch.device] = []
    original = torch.nn.Linear.reset_parameters

    def spy(self: torch.nn.Linear) -> None:
        seen.append(self.weight.device)
        original(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", spy)
    model = load_model(clip_llama)
    assert seen and {d.type for d in seen} == {"meta"}
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_unsupported_model_type_names_the_supported_ones(clip_llama: Path, tmp_path: Path) -> None:
    target = tmp_path / "other"
    shutil.copytree(clip_llama, target)
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "idefics2"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"'idefics2' is not supported; supported model_types: \('llava', 'llava_"):
        load_model(target)
    config["model_type"] = "llava"
    config["text_config"]["model_type"] = "gemma"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"'gemma' is not supported; supported: .*llama.*qwen2"):
        load_model(target)


def test_missing_and_mismatched_tensors_are_reported(clip_llama: Path, tmp_path: Path) -> None:
    target = tmp_path / "broken"
    shutil.copytree(clip_llama, target)
    tensors = load_file(str(target / "model.safetensors"))
    del tensors["multi_modal_projector.linear_2.bias"]
    save_file(tensors, str(target / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \['multi_modal_projector.linear_2.bias'\]"):
        load_model(target)
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="neither a local directory nor a hub id"):
        load_model(tmp_path / "does-not-exist")


def test_hub_id_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_model("llava-hf/llava-1.5-7b-hf")


@torch.no_grad()
def test_resampler_checkpoint_round_trip(tmp_path: Path, clip_llama: Path) -> None:
    base = VLMConfig.from_file(clip_llama / "config.json")
    config = VLMConfig(
        vision=base.vision, text=base.text, projector=ProjectorConfig(kind="resampler", num_queries=6, depth=1),
        image_token_index=base.image_token_index, vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    model = VisionLanguageModel(config).eval()
    save_model(model, tmp_path / "resampler")
    saved = json.loads((tmp_path / "resampler" / "config.json").read_text())
    assert saved["projector_type"] == "resampler" and saved["vlmserve_projector"]["num_queries"] == 6
    again = load_model(tmp_path / "resampler")
    assert again.config == model.config
    ids, pixels = _inputs(model)
    assert torch.equal(model(ids, pixel_values=pixels), again(ids, pixel_values=pixels))
