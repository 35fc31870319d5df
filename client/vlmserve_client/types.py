"""Result types and the accepted image inputs."""

from __future__ import annotations

import os
from typing import Any, Protocol, TypeAlias, runtime_checkable

from pydantic import BaseModel, ConfigDict


class Usage(BaseModel):
    """Token counts of one request (the prompt counts text and image tokens)."""

    model_config = ConfigDict(frozen=True)

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    """The answer to one request.

    `usage` is None only when a streaming server did not report usage (vlmserve always does).
    """

    model_config = ConfigDict(frozen=True)

    id: str
    model: str
    text: str
    finish_reason: str | None
    usage: Usage | None = None


@runtime_checkable
class SupportsSave(Protocol):
    """Anything with PIL's `Image.save(fp, format=...)`; PIL itself is never imported."""

    def save(self, fp: Any, format: str | None = ...) -> Any: ...


ImageInput: TypeAlias = str | os.PathLike[str] | bytes | bytearray | memoryview | SupportsSave
"""An image: a file path, the encoded file's bytes, or a PIL image (sent as PNG)."""

__all__ = ["Completion", "ImageInput", "SupportsSave", "Usage"]
