"""Typed exceptions, built from the server's error body `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


class VlmserveError(Exception):
    """Base class of every error this client raises.

    `status` is the HTTP status (None for connection problems); `type`, `param` and `code` come from the error body.
    """

    def __init__(
        self,
        message: str,
        status: int | None = None,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def __str__(self) -> str:
        prefix = f"HTTP {self.status}: " if self.status is not None else ""
        suffix = f" (code={self.code})" if self.code else ""
        return f"{prefix}{self.message}{suffix}"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(message={self.message!r}, status={self.status!r}, type={self.type!r}, "
                f"param={self.param!r}, code={self.code!r})")


class BadRequestError(VlmserveError):
    """400: malformed or invalid request, bad image, prompt + max_tokens over the context."""


class AuthenticationError(VlmserveError):
    """401: missing or wrong API key."""


class NotFoundError(VlmserveError):
    """404: unknown model or route."""


class PayloadTooLargeError(VlmserveError):
    """413: request body or an image over the server's cap."""


class RateLimitError(VlmserveError):
    """429: the server's queue is full (retried automatically, then raised)."""


class ServerError(VlmserveError):
    """5xx: a fault of the server."""


class ServiceUnavailableError(ServerError):
    """503: the server is loading or draining (retried automatically, then raised)."""


class APIConnectionError(VlmserveError):
    """The server could not be reached, or the connection broke."""


class APITimeoutError(APIConnectionError):
    """The request timed out."""


_BY_STATUS: dict[int, type[VlmserveError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}

# An error event inside an SSE stream carries no HTTP status: infer one from the error type.
_STATUS_BY_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "service_unavailable": 503,
    "server_error": 500,
}


def error_class(status: int) -> type[VlmserveError]:
    """The exception class for an HTTP status."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else VlmserveError


def from_error_body(status: int | None, body: Any, *, retry_after: float | None = None) -> VlmserveError:
    """Build the typed exception from a decoded error body (or anything else a proxy may have sent)."""
    err = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(err, Mapping):
        message = str(err.get("message") or "unknown error")
        etype, param, code = err.get("type"), err.get("param"), err.get("code")
    elif isinstance(err, str):  # {"error": "..."}
        message, etype, param, code = err, None, None, None
    else:  # not our error shape (a proxy's HTML page, for example)
        text = body if isinstance(body, str) else json.dumps(body) if body is not None else ""
        message = text[:500] or "the server answered an error without a body"
        etype, param, code = None, None, None
    if status is None:
        status = _STATUS_BY_TYPE.get(str(etype), 500)
    cls = error_class(status)
    return cls(message, status, _opt_str(etype), _opt_str(param), _opt_str(code), retry_after=retry_after)


def from_response_content(status: int, content: bytes, *, retry_after: float | None = None) -> VlmserveError:
    """Build the typed exception from a raw HTTP error answer."""
    try:
        body: Any = json.loads(content) if content else None
    except ValueError:
        body = content.decode("utf-8", errors="replace").strip()
    return from_error_body(status, body, retry_after=retry_after)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)
