"""What goes into the engine (a prepared request) and what comes out of it (events), and why it may refuse.

All of it is plain data that pickles, so the engine core can run in another process (server/engine/process.py):
tensors, strings, numbers and tuples; errors carry a code and a message, never an HTTP status (server/errors.py
maps codes to statuses).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from vlmserve.model.anyres import Layout
from vlmserve.model.sampling import SamplingParams

from .image_plan import ImagePlan


class EngineError(Exception):
    """Base of the engine's refusals and failures: a stable `code`, a message, and maybe when to retry."""

    code = "internal_error"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (str(self), self.retry_after)


class QueueFull(EngineError):
    code = "queue_full"

    def __init__(self, message: str, retry_after: float | None = 1.0) -> None:
        super().__init__(message, retry_after)


class Unavailable(EngineError):
    code = "unavailable"

    def __init__(self, message: str, retry_after: float | None = 5.0) -> None:
        super().__init__(message, retry_after)


class ContextTooLong(EngineError):
    code = "context_length_exceeded"


class BadRequest(EngineError):
    code = "invalid_request"


class InternalError(EngineError):
    code = "internal_error"


@dataclass(frozen=True)
class DeferredImage:
    """An image sent as its encoded bytes, already checked where it was received (decoded once against the
    limits), to be preprocessed where its visual tokens may already be cached: the Ray ingress sends these and the
    engine replica leases or prepares them (server/scale/replica.py), so a repeat costs no pixel work and no
    pixel tensor on the wire."""

    data: bytes
    digest: str
    plan: ImagePlan
    view: int  # which of the image's views (pan and scan: the image, then its crops) this input is


@dataclass(frozen=True)
class ImageInput:
    """One image (or audio clip: `audio_frames` set), already decoded and preprocessed off the engine's loop.

    `key` names what the image's visual tokens are a pure function of: its bytes and the processing settings that
    made its pixels (RequestPreparer builds it). It keys the visual-token cache and, with the offset inside the
    image, every prefix-cache block that covers the image's tokens. `visual_tokens` is set instead of
    `pixel_values` when the caller already holds the image's encoded tokens (a lease from `Engine.lease_image`);
    `deferred` instead of both when the image travels as bytes to an engine replica, which resolves it before its
    engine sees it (an engine given a deferred input fails the request: nothing to encode).
    """

    key: str
    pixel_values: torch.Tensor | None  # (C, H, W), or a tiled model's (T, C, H, W)
    num_tokens: int  # placeholder slots this image fills in the prompt
    visual_tokens: torch.Tensor | None = None  # (num_tokens, D), from a lease; then pixel_values may be None
    layout: Layout | None = None  # a tiled (llava_next) image's size and grid of tiles
    grid: tuple[int, int, int] | None = None  # qwen2_vl: (t, h, w) in patches; pixel_values (t*h*w, C*T*P*P)
    token_layout: tuple[int, ...] | None = None  # idefics3: its span's ids (tile tags and slots), num_tokens long
    audio_frames: int | None = None  # an audio clip (not an image): its valid mel frames (0 for a lease); pixel_values
    # its (M, F) features
    deferred: DeferredImage | None = None  # bytes to prepare where the caches are (then pixel_values is None)

    @property
    def is_audio(self) -> bool:
        return self.audio_frames is not None

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError("an image fills at least one placeholder slot")


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
    cache_salt: str = ""  # requests share cached prefixes (and visual tokens) only with equal salts
    logprobs: int | None = None  # None: none; k: each generated token's log-probability and the k likeliest
    grammar: str | None = None  # llguidance's serialized grammar the output must follow (structured.py)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    image_tokens: int = 0  # prompt tokens that are images' visual tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (its raw logits: before penalties, bias and
    temperature), and the `k` likeliest tokens at that step, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob)


@dataclass(frozen=True)
class TextDelta:
    request_id: str
    text: str
    token_ids: tuple[int, ...]  # the tokens accepted since the previous delta (text held back for stops included)
    logprobs: tuple[TokenLogprob, ...] = ()  # theirs, when the request asked


@dataclass(frozen=True)
class Finished:
    request_id: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    usage: Usage
    text: str  # the whole completion, stop strings removed
    token_ids: tuple[int, ...] = ()  # every generated id, EOS included
    logprobs: tuple[TokenLogprob, ...] = ()  # every generated token's but a stopping EOS / stop id, when asked


@dataclass(frozen=True)
class Failed:
    request_id: str
    error: EngineError


Event = TextDelta | Finished | Failed
EventSink = Callable[[Event], None]
