"""The API's one error shape, `{"error": {"message", "type", "param", "code"}}`, for every failure."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmserve.model.audio_decode import AudioError
from vlmserve.model.image_decode import ImageError

from .engine import EngineError
from .remote_images import RemoteImageError
from .schemas import error_body

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


# What each engine error code answers with (the engine itself knows no HTTP).
ENGINE_STATUS = {
    "queue_full": 429,
    "unavailable": 503,
    "context_length_exceeded": 400,
    "invalid_request": 400,
    "internal_error": 500,
}


class APIError(Exception):
    """An error answer: status, message, and optionally the offending parameter, a code and a Retry-After."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    @classmethod
    def from_exception(cls, exc: Exception, *, param: str | None = None) -> APIError:
        """The API error for an engine refusal, a bad image or a refused URL."""
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, EngineError):
            return cls(ENGINE_STATUS.get(exc.code, 500), str(exc), code=exc.code, retry_after=exc.retry_after,
                       param="max_tokens" if exc.code == "context_length_exceeded" else param)
        if isinstance(exc, ImageError | AudioError):
            return cls(exc.status_code, str(exc), code=exc.code, param=param)
        if isinstance(exc, RemoteImageError):
            return cls(413 if exc.too_large else 400, str(exc), code="invalid_image_url", param=param)
        log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)  # a fault of ours: keep the trace
        return cls(500, "internal error", code="internal_error")

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else None
        if self.status == 401:
            headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
        body = error_body(self.message, _TYPES.get(self.status, "invalid_request_error"), param=self.param,
                          code=self.code)
        return JSONResponse(body, status_code=self.status, headers=headers)

    def body_text(self) -> str:
        """The JSON body `response()` sends, as text (a stream's error event carries it)."""
        return bytes(self.response().body).decode()


# Validation error types that are codes of their own (the rest are `invalid_value`)
_CODES = {
    "extra_forbidden": "unknown_parameter",
    "unsupported_parameter": "unsupported_parameter",  # an OpenAI field this server does not implement
    "unsupported_value": "unsupported_value",
}


def _loc(loc: tuple[object, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # The deepest location names the problem best: a content part that fits none of a union's shapes fails
        # every branch, and the branch that got furthest (`...image_url.detail`) is the one the client meant.
        first: dict[str, Any] = (max(errors, key=lambda e: len(e.get("loc", ()))) if errors
                                 else {"loc": (), "msg": "invalid request"})
        param = _loc(tuple(first.get("loc", ())))
        kind = first.get("type", "")
        if kind == "json_invalid":
            message, param = "the body is not valid JSON", None  # its loc is a byte offset, not a parameter
        elif kind == "model_attributes_type" and param is None:
            message = "the body must be a JSON object"
        elif kind == "extra_forbidden":
            message = f"unknown parameter {param!r}: neither OpenAI's API nor a documented extra of this server"
        else:
            message = f"{param + ': ' if param else ''}{first.get('msg', 'invalid value')}"
        if len(errors) > 1 and kind != "json_invalid":
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return APIError(400, message, param=param, code=_CODES.get(kind, "invalid_value")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail) if exc.status_code != 404 else f"no route {request.method} {request.url.path}"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, message, code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "internal error", code="internal_error").response()
