"""What goes into the engine (a prepared request) and what comes out of it (events), and why it may refuse."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from vlmserve.model.sampling import SamplingParams


class EngineError(Exception):
    """Base of the engine's refusals and failures; `status` is the HTTP status the server should answer with."""

    status = 500
    code = "internal_error"
    retry_after: float | None = None


class QueueFull(EngineError):
    status, code = 429, "queue_full"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(EngineError):
    status, code = 503, "unavailable"

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ContextTooLong(EngineError):
    status, code = 400, "context_length_exceeded"


class BadRequest(EngineError):
    status, code = 400, "invalid_request"


class InternalError(EngineError):
    status, code = 500, "internal_error"


@dataclass(frozen=True)
class ImageInput:
    """One image, already decoded and preprocessed off the engine's loop."""

    content_hash: str  # hash of the image bytes; keys the visual-token cache
    pixel_values: torch.Tensor | None  # (C, H, W); None when the caller pinned the cached tokens (Engine.pin_image)


@dataclass
class EngineRequest:
    """A tokenized request: prompt ids with image placeholders already expanded, plus its images in order."""

    request_id: str
    prompt_ids: list[int]
    images: Sequence[ImageInput] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None  # None: the rest of the context
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()  # in addition to the checkpoint's EOS ids
    ignore_eos: bool = False


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TextDelta:
    request_id: str
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    request_id: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    usage: Usage
    text: str  # the whole completion, stop strings removed
    token_ids: tuple[int, ...] = ()  # every generated id, EOS included


@dataclass(frozen=True)
class Failed:
    request_id: str
    error: EngineError


Event = TextDelta | Finished | Failed
EventSink = Callable[[Event], None]
