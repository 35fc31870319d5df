"""The VLM families, one file per composition, each building its `FamilySpec` (model/registry.py) from the shared
parts. `FAMILIES` is the registry's table, in the order the supported model_types are listed.

Adding a family: a file here with its config.json reader and writer, its checks, its checkpoint key rules and its
encoder entry point in a `FamilySpec`, and that spec in `FAMILIES`.
"""

from __future__ import annotations

from ..registry import FamilySpec
from .gemma3 import GEMMA3
from .idefics3 import IDEFICS3
from .llava import LLAVA, LLAVA_NEXT, LLAVA_ONEVISION
from .qwen2_audio import QWEN2_AUDIO
from .qwen2_vl import QWEN2_VL

__all__ = ["FAMILIES"]

FAMILIES: tuple[FamilySpec, ...] = (LLAVA, LLAVA_NEXT, LLAVA_ONEVISION, QWEN2_VL, IDEFICS3, GEMMA3, QWEN2_AUDIO)
