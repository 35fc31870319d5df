"""The model registry: what each VLM family is, keyed by the checkpoint's `model_type`.

A family is one composition of the shared parts (the towers of model/vision.py and model/qwen2_vision.py, the
projectors of model/projector.py, the LMs of model/text.py and model/gemma3_text.py, the audio tower of
model/audio.py). Its `FamilySpec` says how its config.json becomes a `VLMConfig` and back, what a valid config of it
is, where its tensors live in the Hub's checkpoints (both ways), and how `VisionLanguageModel` encodes its images.
Each family lives in one file under model/families/, whose `FAMILIES` lists them; adding a family is adding one.

The table is filled on the first lookup rather than at import: the family files build `VLMConfig`s (model/config.py)
and model/config.py dispatches through this module, so importing the families at the top here would close the
cycle config -> registry -> families -> config. This module imports nothing of the model at run time; the families
import it (for `FamilySpec`) and model/config.py, both complete by the time anything is looked up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .text_config import SUPPORTED_TEXT_TYPES, ConfigError
from .vision_config import SUPPORTED_VISION_TYPES

if TYPE_CHECKING:
    from .anyres import Anyres
    from .config import VLMConfig

__all__ = ["EncoderEntry", "FamilySpec", "FeatureSelect", "KeyRules", "family_spec", "registered_families",
           "spec_for", "supported_model_types"]

# Which `VisionLanguageModel` entry point encodes a batch of its images (server/engine/model_runner.py `_encode`):
# `images` one view each (encode_images), `tiled` anyres tiles and their layouts (encode_tiled), `patches` native-
# resolution patches and their grids (encode_patches), `split` tiles with their token layouts (encode_split).
EncoderEntry = Literal["images", "tiled", "patches", "split"]
# The tower's output the projector reads (model/vlm.py `select_features`): `layers` LLaVA's selected layer(s), the
# class token dropped by `default`; `normed` the last layer after the post-LayerNorm (SigLIP's last_hidden_state);
# `normed_bucketed` the same with the patches at Idefics3's bucketed positions (tiles of any size).
FeatureSelect = Literal["layers", "normed", "normed_bucketed"]
# (checkpoint prefix or pattern, ours) pairs; first match wins.
KeyRules = tuple[tuple[str, str], ...]


@dataclass(frozen=True, eq=False)
class FamilySpec:
    """One family: its model_types, its config.json both ways, its checkpoint layout, and how it encodes images."""

    family: str  # `VLMConfig.family`
    architectures: Mapping[str, str]  # each model_type it answers -> transformers' class (config.json `architectures`)
    from_hf: Callable[[dict[str, Any]], VLMConfig]  # config.json (its model_type one of the above) -> our config
    to_hf: Callable[[VLMConfig], dict[str, Any]]  # our config -> a config.json transformers loads
    check: Callable[[VLMConfig], None]  # raises ConfigError; run by VLMConfig.__post_init__ before derived fields
    save_rules: KeyRules  # our name's prefix -> the Hub's, for each tensor we save (model/weights.py)
    load_rules: KeyRules = ()  # regex on a checkpoint key -> our prefix, tried before the shared rules (weights.py)
    encoder: EncoderEntry | None = "images"  # None: no images (qwen2_audio)
    features: FeatureSelect = "layers"
    anyres: Callable[[VLMConfig], Anyres] | None = None  # the tiling of an `encoder="tiled"` family
    bidirectional_images: bool = False  # in prefill an image's tokens attend to each other both ways (Gemma 3)
    dense_forward: bool = True  # images may go through `VisionLanguageModel.forward` (else only through the engine)
    compile_encoder: bool = False  # the runner compiles encode_images for batches (measured on LLaVA's tower only)
    audio_sidecar: bool = True  # an audio tower beside its vision sits in `audio/`; False: in the checkpoint itself

    def __post_init__(self) -> None:
        if not self.architectures:
            raise ValueError(f"family {self.family!r} answers no model_type")
        if (self.encoder == "tiled") != (self.anyres is not None):
            raise ValueError(f"family {self.family!r}: a tiled encoder and an anyres tiling go together")

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(self.architectures)


@functools.cache
def _tables() -> tuple[dict[str, FamilySpec], dict[str, FamilySpec]]:
    """(model_type -> spec, family -> spec), from model/families/ on the first lookup (see the module docstring)."""
    from .families import FAMILIES  # here, not at the top: the families import model/config.py, which imports us

    by_type: dict[str, FamilySpec] = {}
    by_family: dict[str, FamilySpec] = {}
    for spec in FAMILIES:
        if spec.family in by_family:
            raise ValueError(f"family {spec.family!r} is registered twice")
        by_family[spec.family] = spec
        for model_type in spec.model_types:
            if model_type in by_type:
                raise ValueError(f"model_type {model_type!r} is answered by {by_type[model_type].family!r} and "
                                 f"{spec.family!r}")
            by_type[model_type] = spec
    return by_type, by_family


def registered_families() -> tuple[FamilySpec, ...]:
    """Every family, in registration order."""
    return tuple(_tables()[1].values())


def supported_model_types() -> tuple[str, ...]:
    """Every model_type a config.json may name, in registration order."""
    return tuple(_tables()[0])


def spec_for(model_type: object) -> FamilySpec:
    """The family a config.json's `model_type` names; a ConfigError naming the supported ones for any other."""
    spec = _tables()[0].get(model_type) if isinstance(model_type, str) else None
    if spec is None:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; supported model_types: {supported_model_types()} "
            f"(vision: {SUPPORTED_VISION_TYPES}; text: {SUPPORTED_TEXT_TYPES})"
        )
    return spec


def family_spec(family: str) -> FamilySpec:
    """The spec of a `VLMConfig.family`; a ConfigError for a family nobody registered."""
    spec = _tables()[1].get(family)
    if spec is None:
        raise ConfigError(f"family {family!r} is not registered; registered: {tuple(_tables()[1])}")
    return spec
