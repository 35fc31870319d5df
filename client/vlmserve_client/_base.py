"""What the sync and async clients share: request building, images, retry policy, SSE decoding, results."""

from __future__ import annotations

import base64
import email.utils
import io
import json
import os
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypedDict

import httpx

from .errors import APIConnectionError, APITimeoutError, ServerError, from_error_body
from .types import Completion, ImageInput, Usage

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
MAX_BACKOFF = 8.0  # seconds, the longest exponential-backoff wait
MAX_RETRY_AFTER = 30.0  # seconds, the longest Retry-After honoured
RETRY_STATUSES = frozenset({429, 503})
USER_AGENT = "vlmserve-client/0.1.0"


# ---------------------------------------------------------------- configuration


def normalize_base_url(base_url: str) -> str:
    """The server root: no trailing slash, and a trailing `/v1` (as the openai SDK wants it) removed."""
    url = base_url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def default_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else os.environ.get("VLMSERVE_API_KEY") or None


def as_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    return timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)


class PoolLimits(TypedDict, total=False):
    """The keyword arguments `pool_limits` hands to `httpx.Client` / `httpx.AsyncClient`."""

    limits: httpx.Limits


def pool_limits(max_connections: int | None) -> PoolLimits:
    """httpx's `limits` argument: its default pool (100 connections) for None, else `max_connections`, each idle
    one kept alive."""
    return {} if max_connections is None else {"limits": httpx.Limits(max_connections=max_connections)}


# ---------------------------------------------------------------- images

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def sniff_mime(data: bytes) -> str:
    """The image MIME type from the file's magic bytes (PNG, JPEG, GIF, WEBP, BMP), else application/octet-stream."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    return "application/octet-stream"


def image_bytes(image: ImageInput) -> bytes:
    """The encoded bytes of an image given as a path, bytes, or a PIL image (saved as PNG)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        with open(image, "rb") as f:
            return f.read()
    save = getattr(image, "save", None)
    if callable(save):  # a PIL image, duck-typed
        buf = io.BytesIO()
        save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"an image must be a path, bytes or a PIL image, not {type(image).__name__}")


def data_url(image: ImageInput) -> str:
    """A `data:<mime>;base64,...` URL of the image."""
    data = image_bytes(image)
    return f"data:{sniff_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


def _images(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    # One image passed without a list is accepted too (a str or bytes is one image, not a sequence of them).
    if isinstance(images, str | bytes | bytearray | memoryview | os.PathLike) or hasattr(images, "save"):
        return [images]  # pyright: ignore[reportReturnType]  (mypy narrows by hasattr, pyright does not)
    return list(images)  # pyright: ignore[reportArgumentType]


def _stops(stop: str | Sequence[str] | None) -> list[str]:
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


# ---------------------------------------------------------------- request bodies


def user_message(prompt: str, images: ImageInput | Sequence[ImageInput] = ()) -> dict[str, Any]:
    """One user turn as an OpenAI message: the images' image_url parts (data URLs) first, then the text; plain
    text without images. What `chat` sends, and what a conversation keeps as history."""
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in _images(images)]
    return {"role": "user", "content": [*parts, {"type": "text", "text": prompt}] if parts else prompt}


def chat_body(
    prompt: str,
    *,
    images: ImageInput | Sequence[ImageInput],
    model: str | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: str | Sequence[str] | None,
    system: str | None,
    stream: bool,
    response_format: Mapping[str, Any] | None = None,
    extra_body: Mapping[str, Any] | None = None,
    history: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The JSON body of POST /v1/chat/completions: the system message, the `history` (earlier turns, OpenAI
    messages, as given), then the user turn (`user_message`); `extra_body`'s fields last, as given (they override)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system is not None else []
    messages.extend(dict(m) for m in history)
    messages.append(user_message(prompt, images))
    body: dict[str, Any] = {"messages": messages}
    optional = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                "top_k": top_k, "seed": seed}
    body.update({k: v for k, v in optional.items() if v is not None})
    stops = _stops(stop)
    if stops:
        body["stop"] = stops
    if response_format is not None:
        body["response_format"] = dict(response_format)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    body.update(extra_body or {})
    return body


def generate_form(
    prompt: str,
    *,
    images: ImageInput | Sequence[ImageInput],
    model: str | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: str | Sequence[str] | None,
) -> tuple[dict[str, Any], list[tuple[str, tuple[str, bytes, str]]]]:
    """Form fields and files of the multipart POST /v1/generate (`image` repeated, in order)."""
    data: dict[str, Any] = {"prompt": prompt}
    optional = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                "top_k": top_k, "seed": seed}
    data.update({k: str(v) for k, v in optional.items() if v is not None})
    stops = _stops(stop)
    if stops:
        data["stop"] = stops
    files = []
    for i, image in enumerate(_images(images)):
        raw = image_bytes(image)
        mime = sniff_mime(raw)
        ext = mime.rsplit("/", 1)[-1] if mime.startswith("image/") else "bin"
        files.append(("image", (f"image{i}.{ext}", raw, mime)))
    return data, files


# ---------------------------------------------------------------- retries


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def retry_delay(attempt: int, backoff: float, retry_after: float | None) -> float:
    """Seconds to wait before retry number `attempt + 1`: Retry-After (capped) if given, else exponential backoff
    with jitter (half fixed, half random)."""
    if retry_after is not None:
        return min(retry_after, MAX_RETRY_AFTER)
    base = min(backoff * 2.0**attempt, MAX_BACKOFF)
    return base / 2 + random.uniform(0, base / 2)


def retryable_transport_error(exc: httpx.TransportError) -> bool:
    """Connection failures are retried; a read/write timeout is not (the server may be busy generating)."""
    return isinstance(exc, httpx.NetworkError | httpx.ConnectTimeout | httpx.PoolTimeout | httpx.RemoteProtocolError)


def connection_error(exc: httpx.TransportError, url: str) -> APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request to {url} timed out ({type(exc).__name__})")
    return APIConnectionError(f"cannot reach {url}: {exc or type(exc).__name__}")


# ---------------------------------------------------------------- responses


def parse_json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        raise ServerError(f"the server answered invalid JSON: {content[:200]!r}", 200) from None


def _usage(raw: Any) -> Usage | None:
    return Usage.model_validate(raw) if isinstance(raw, Mapping) else None


def completion_from_chat(body: Any) -> Completion:
    """A Completion from an OpenAI chat.completion object."""
    try:
        choice = body["choices"][0]
        return Completion(id=body["id"], model=body["model"], text=choice["message"]["content"] or "",
                          finish_reason=choice.get("finish_reason"), usage=_usage(body.get("usage")))
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ServerError(f"unexpected chat completion answer: {e!r}", 200) from None


def completion_from_generate(body: Any) -> Completion:
    """A Completion from a /v1/generate answer."""
    try:
        return Completion(id=body["id"], model=body["model"], text=body["text"],
                          finish_reason=body.get("finish_reason"), usage=_usage(body.get("usage")))
    except (KeyError, TypeError, ValueError) as e:
        raise ServerError(f"unexpected generate answer: {e!r}", 200) from None


# ---------------------------------------------------------------- server-sent events


class SSELineSplitter:
    """Splits a text/event-stream into lines at CR, LF or CRLF only, as the SSE specification says.

    httpx's `iter_lines` follows `str.splitlines`, which also breaks at U+0085, U+2028, U+2029 and a few control
    characters: those may appear raw inside an event's JSON (the text a model generates), so a stream must not be
    read with it.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._pending_cr = False

    def feed(self, text: str) -> list[str]:
        """The lines completed by this chunk of text (without their line endings)."""
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]  # the LF of a CRLF split across two chunks
        self._pending_cr = False
        lines = (self._buffer + text).replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if text.endswith("\r"):
            self._pending_cr = True
        self._buffer = lines.pop()
        return lines

    def close(self) -> list[str]:
        """The unterminated last line, if any."""
        rest, self._buffer = self._buffer, ""
        return [rest] if rest else []


class SSEDecoder:
    """Turns the lines of a text/event-stream into the `data` of each event (multi-line data joined by newlines)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """One line (without its newline); returns the event's data when a blank line completes an event."""
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):  # a comment (keep-alive)
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None  # event, id and retry fields are not used

    def events(self, lines: Iterable[str]) -> Iterable[str]:
        """All events of a finished list of lines (the last one is flushed even without a blank line)."""
        for line in [*lines, ""]:
            data = self.feed(line)
            if data is not None:
                yield data


class ChatStreamState:
    """Accumulates a chat completion stream: returns each text delta and builds the final Completion."""

    def __init__(self) -> None:
        self.id = ""
        self.model = ""
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.done = False
        self._lines = SSELineSplitter()
        self._events = SSEDecoder()

    def feed(self, text: str) -> Iterator[str]:
        """The text deltas of the events this chunk of the stream completes; nothing once `[DONE]` was read."""
        return self._read(self._lines.feed(text))

    def end_of_stream(self) -> Iterator[str]:
        """The text deltas of an event the stream left unterminated."""
        return self._read([*self._lines.close(), ""])

    def _read(self, lines: Iterable[str]) -> Iterator[str]:
        for line in lines:
            if self.done:
                return
            data = self._events.feed(line)
            if data is not None:
                delta = self.handle(data)
                if delta:
                    yield delta

    def handle(self, data: str) -> str | None:
        """One event's data; the text delta it carries, if any. Raises the typed error of an error event."""
        if data.strip() == "[DONE]":
            self.done = True
            return None
        try:
            chunk = json.loads(data)
        except ValueError:
            raise ServerError(f"malformed event in the stream: {data[:200]!r}", 200) from None
        if not isinstance(chunk, Mapping):
            raise ServerError(f"malformed event in the stream: {data[:200]!r}", 200)
        if "error" in chunk:
            raise from_error_body(None, chunk)
        self.id = chunk.get("id") or self.id
        self.model = chunk.get("model") or self.model
        if chunk.get("usage"):
            self.usage = _usage(chunk["usage"])
        delta_text = None
        for choice in chunk.get("choices") or ():
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            content = (choice.get("delta") or {}).get("content")
            if content:
                delta_text = content
                self.parts.append(content)
        return delta_text

    def finish(self) -> Completion:
        """The Completion at the end of the stream; raises if the stream broke off before it ended."""
        if not self.done and self.finish_reason is None:
            raise APIConnectionError("the stream ended before the answer was complete")
        return Completion(id=self.id, model=self.model, text="".join(self.parts), finish_reason=self.finish_reason,
                          usage=self.usage)

