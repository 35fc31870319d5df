"""`x-vlmserve-replica` on every generation response: the stable rank of the engine replica that served it.

A pure ASGI middleware gives each HTTP request a slot; `EventStream` notes the first engine request it submits
(`note_request`); when the response starts, the middleware asks the engine which replica took it (one process:
`0`; on Ray Serve, the rank the replica sent first) and adds the header. Responses that submitted nothing carry
none.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from .engine.serving import ServingEngine

log = logging.getLogger(__name__)
HEADER = b"x-vlmserve-replica"
RANK_TIMEOUT_S = 60.0  # a rank that does not come (the replica died unheard) leaves the header out, never hangs


@dataclass
class _Slot:
    engine: ServingEngine | None = None
    request_id: str = ""


_slot: ContextVar[_Slot | None] = ContextVar("vlmserve_replica_slot", default=None)


def note_request(engine: ServingEngine, request_id: str) -> None:
    """Remember the HTTP request's first engine request (its later ones, `n` choices, go the same way)."""
    slot = _slot.get()
    if slot is not None and slot.engine is None:
        slot.engine, slot.request_id = engine, request_id


class ReplicaHeader:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        slot = _Slot()
        _slot.set(slot)

        async def send_with_rank(message: Message) -> None:
            if message["type"] == "http.response.start" and slot.engine is not None:
                try:
                    rank = await asyncio.wait_for(slot.engine.replica_rank(slot.request_id), RANK_TIMEOUT_S)
                except TimeoutError:
                    log.warning("request %s: no replica rank after %.0f s", slot.request_id, RANK_TIMEOUT_S)
                    rank = None
                if rank is not None:
                    message = {**message, "headers": [*message.get("headers", []), (HEADER, str(rank).encode())]}
            await send(message)

        await self.app(scope, receive, send_with_rank)
