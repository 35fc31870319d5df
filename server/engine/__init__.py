"""The generation engine: continuous batching over one model, free of any web framework."""

from .core import EngineConfig, EngineCore
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
    "InternalError",
    "Observer",
    "QueueFull",
    "TextDelta",
    "Unavailable",
    "Usage",
]
