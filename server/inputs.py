"""From an OpenAI chat request to tokenizer messages and image bytes: data URLs, optional remote URLs, limits."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import APIError
from .remote_images import fetch_image
from .schemas import AudioPart, ImagePart, Message
from .settings import Settings

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)
_IMAGE_MIMES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp", "image/x-ms-bmp",
                "application/octet-stream"}


@dataclass(frozen=True)
class ImageRef:
    """One image of a request, before any of its bytes are read: where it is and its budget."""

    url: str
    param: str  # where it sits in the request, for errors
    detail: str | None = None
    max_image_tokens: int | None = None


@dataclass(frozen=True)
class AudioRef:
    """One audio clip of a request: its base64 data as sent, its declared format, where it sits (for errors)."""

    data: str
    format: str
    param: str


@dataclass(frozen=True)
class ChatInput:
    messages: list[dict[str, Any]]  # tokenizer-shaped: image and audio parts are markers
    images: list[ImageRef]  # in prompt order
    audio: list[AudioRef] = field(default_factory=list)  # in prompt order

    @property
    def has_tool_turns(self) -> bool:
        """Whether the history holds tool calls or tool results (which only a tools-aware template shows)."""
        return any(m["role"] == "tool" or m.get("tool_calls") for m in self.messages)


def chat_input(messages: list[Message]) -> ChatInput:
    """Tokenizer messages plus the images in order (their count and budgets are checked by the pipeline)."""
    out: list[dict[str, Any]] = []
    urls: list[ImageRef] = []
    clips: list[AudioRef] = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        turn: dict[str, Any] = {"role": role}
        if m.tool_calls:
            turn["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            turn["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            turn["name"] = m.name
        out.append(turn)
        if m.content is None or isinstance(m.content, str):
            turn["content"] = m.content or ""
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(m.content):
            if isinstance(part, ImagePart):
                check_image_role(role, f"messages.{i}.content.{j}")
                urls.append(ImageRef(part.image_url.url, f"messages.{i}.content.{j}.image_url", part.image_url.detail,
                                     part.image_url.max_image_tokens))
                parts.append({"type": "image"})
            elif isinstance(part, AudioPart):
                check_image_role(role, f"messages.{i}.content.{j}", "audio clips")
                clips.append(AudioRef(part.input_audio.data, part.input_audio.format,
                                      f"messages.{i}.content.{j}.input_audio"))
                parts.append({"type": "audio"})
            else:
                parts.append({"type": "text", "text": part.text})
        turn["content"] = parts
    return ChatInput(out, urls, clips)


def check_image_role(role: str, param: str, what: str = "images") -> None:
    """Images (and audio) go in user turns only (every route's rule): a 400 naming where one stands otherwise."""
    if role != "user":
        raise APIError(400, f"{what} are only accepted in user messages ({param} is in a {role} message)",
                       param=param, code="invalid_value")


def decode_data_url(url: str, max_bytes: int, param: str) -> bytes:
    """The bytes of a base64 `data:` image URL; the size is checked before decoding."""
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise APIError(400, "image data URLs must look like data:image/png;base64,<data>", param=param,
                       code="invalid_image_url")
    mime = (match.group("mime") or "").lower()
    if mime and mime not in _IMAGE_MIMES:
        raise APIError(400, f"unsupported image type {mime!r}", param=param, code="unsupported_image")
    payload = url[match.end():]
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise APIError(413, f"image is over the limit of {max_bytes} bytes", param=param, code="image_too_large")
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"image data URL is not valid base64: {e}", param=param, code="invalid_image") from e
    if not data:
        raise APIError(400, "image data URL is empty", param=param, code="invalid_image")
    return data


async def image_bytes(url: str, param: str, settings: Settings) -> bytes:
    """Bytes of an image part's URL: a data URL, or (when enabled) an allow-listed http(s) URL."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, settings.max_image_bytes, param)
    if scheme in ("http", "https"):
        if not settings.allow_remote_images:
            raise APIError(400, "remote image URLs are disabled on this server; send the image as a data URL",
                           param=param, code="remote_images_disabled")
        try:
            return await fetch_image(url, allowed_hosts=settings.remote_image_hosts,
                                     max_bytes=settings.max_image_bytes, timeout=settings.remote_image_timeout)
        except Exception as e:
            raise APIError.from_exception(e, param=param) from e
    raise APIError(400, f"image URL scheme {scheme or url[:16]!r} is not supported (use a data: URL)", param=param,
                   code="invalid_image_url")
