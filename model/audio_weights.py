"""Where an audio tower's tensors live in a checkpoint, for model/weights.py.

- `qwen2_audio` (the Hub's layout): `audio_tower.*` and `multi_modal_projector.linear.*` beside `language_model.*`;
  its `multi_modal_projector` is the audio projector (LLaVA's is the vision one), so its key rules are its family's
  own (model/families/qwen2_audio.py), and its spec says it reads no `audio/` folder (`FamilySpec.audio_sidecar`).
- A vision-language checkpoint with an `audio/` folder: `audio/config.json` (model/audio_config.py `AudioConfig`),
  `audio/model.safetensors` with the same `audio_tower.*` / `multi_modal_projector.*` names, and
  `audio/preprocessor_config.json` (the Whisper feature extractor). transformers and vLLM read the folder above it
  as the LLaVA checkpoint it is and never look inside `audio/`.
Our modules sit under `audio.` (model/vlm.py `VisionLanguageModel.audio`).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .audio_config import AudioConfig
from .config import VLMConfig

if TYPE_CHECKING:
    from .vlm import VisionLanguageModel

log = logging.getLogger(__name__)

AUDIO_DIR = "audio"
AUDIO_SAVE_RULES: tuple[tuple[str, str], ...] = (
    ("audio.audio_tower.", "audio_tower."),
    ("audio.multi_modal_projector.", "multi_modal_projector."),
)


def with_audio_sidecar(config: VLMConfig, ckpt: Path) -> VLMConfig:
    """`config` with the audio tower of `ckpt/audio/` where there is one (a new config; none is mutated)."""
    file = ckpt / AUDIO_DIR / "config.json"
    if config.audio is not None or not file.is_file():
        return config
    return replace(config, audio=AudioConfig.from_hf(json.loads(file.read_text())))


def audio_sidecar(tensors: Iterator[tuple[str, torch.Tensor]], ckpt: Path, config: VLMConfig, *,
                  device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors, then (for a vision-language checkpoint with an `audio/` folder) its audio ones."""
    yield from tensors
    file = ckpt / AUDIO_DIR / "model.safetensors"
    if not config.spec.audio_sidecar or config.audio is None:
        return
    if not file.is_file():
        raise ValueError(f"{ckpt / AUDIO_DIR} has a config.json but no model.safetensors")
    with safe_open(str(file), framework="pt", device=str(torch.device(device))) as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
            t = f.get_tensor(key)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            yield "audio." + key.removeprefix("model."), t
    log.info("audio tower from %s", file)


def save_audio_sidecar(model: VisionLanguageModel, out: Path, *, dtype: torch.dtype | None = None,
                       copy_from: Path | None = None) -> None:
    """Write the `audio/` folder of a vision-language model with an audio tower (config, weights under Qwen2-Audio's
    names, and the feature extractor of `copy_from/audio/` where there is one); nothing for any other model."""
    config = model.config
    if config.audio is None or not config.spec.audio_sidecar:
        return
    folder = out / AUDIO_DIR
    folder.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        for prefix, target in AUDIO_SAVE_RULES:
            if name.startswith(prefix):
                t = tensor.detach().contiguous().cpu()
                state[target + name[len(prefix):]] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config.audio.to_hf(), indent=2) + "\n")
    features = copy_from / AUDIO_DIR / "preprocessor_config.json" if copy_from is not None else None
    if features is not None and features.is_file():
        shutil.copy2(features, folder / features.name)
