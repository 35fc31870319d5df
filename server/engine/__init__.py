"""The generation engine: continuous batching over one model, free of any web framework.

`EngineConfig` and `ImageLimits` (config.py) load at once and without torch: the server's settings take their
defaults from them, and `vlmserve --help` should not wait for torch. Everything else loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import EngineConfig, ImageLimits

if TYPE_CHECKING:
    from .core import EngineCore
    from .engine import Engine
    from .observer import EngineCounters, Observer
    from .requests import (
        BadRequest,
        ContextTooLong,
        EngineError,
        EngineRequest,
        Event,
        Failed,
        Finished,
        ImageInput,
        InternalError,
        QueueFull,
        TextDelta,
        Unavailable,
        Usage,
    )

_LAZY = {
    "EngineCore": "core",
    "Engine": "engine",
    "EngineCounters": "observer",
    "Observer": "observer",
    **dict.fromkeys(
        ("BadRequest", "ContextTooLong", "EngineError", "EngineRequest", "Event", "Failed", "Finished", "ImageInput",
         "InternalError", "QueueFull", "TextDelta", "Unavailable", "Usage"),
        "requests",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "BadRequest",
    "ContextTooLong",
    "Engine",
    "EngineConfig",
    "EngineCore",
    "EngineCounters",
    "EngineError",
    "EngineRequest",
    "Event",
    "Failed",
    "Finished",
    "ImageInput",
    "ImageLimits",
    "InternalError",
    "Observer",
    "QueueFull",
    "TextDelta",
    "Unavailable",
    "Usage",
]
