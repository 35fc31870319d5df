"""Pure ASGI middleware: request bodies (size cap, time limit, a budget for all bodies held at once) and per-route
status counters."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .schemas import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _send_error(send: Send, status: int, message: str, kind: str, code: str,
                      retry_after: int | None = None) -> None:
    body = json.dumps(error_body(message, kind, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyBudget:
    """Bytes of request bodies held at once, all requests together: many slow or large uploads cannot add up to more
    memory than this. Used from the event loop only, so a plain counter."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.used = max_bytes, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.max_bytes:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class BodyLimit:
    """Reads the whole body, then replays it to the app. Past `max_bytes` (declared or actual): 413. Not all there
    within `timeout` seconds: 408. Past what `budget` has left for all bodies together: 503 with Retry-After. Each
    before the app sees a byte; the body's bytes count against the budget until the app has answered."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float | None = None,
                 budget: BodyBudget | None = None) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout
        self.budget = budget or BodyBudget(2**62)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        held = 0
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            return
                        chunk = message.get("body", b"")
                        if held + len(chunk) > self.max_bytes:
                            await self._too_large(send)
                            return
                        if not self.budget.take(len(chunk)):
                            await _send_error(send, 503, "the server is holding too many request bodies; retry "
                                              "shortly", "service_unavailable", "server_busy", retry_after=1)
                            return
                        held += len(chunk)
                        chunks.append(chunk)
                        if not message.get("more_body", False):
                            break
            except TimeoutError:
                await _send_error(send, 408, f"the request body did not arrive within {self.timeout:g} seconds",
                                  "invalid_request_error", "request_timeout")
                return
            body = b"".join(chunks)
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        finally:
            self.budget.give(held)

    async def _too_large(self, send: Send) -> None:
        await _send_error(send, 413, f"the request body is over the limit of {self.max_bytes} bytes",
                          "invalid_request_error", "request_too_large")


class StatusCounter:
    """Counts responses by route template and status (unknown paths share one label: no cardinality blow-up)."""

    def __init__(self, app: ASGIApp, count: Callable[[str, int], None]) -> None:
        self.app, self.count = app, count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            self.count(getattr(route, "path", "unmatched"), status)
