"""Bridging the engine's thread to asyncio: a request's events arrive on an asyncio queue; SSE framing."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request

from .engine import EngineError, EngineRequest, Event, Failed, Finished
from .engine.serving import ServingEngine
from .replica_header import note_request

log = logging.getLogger(__name__)


class _Dispatcher:
    """Hands events from the engine thread to the event loop with one wake-up per burst, not one per event: a
    decode step that streams a token to 16 clients costs one `call_soon_threadsafe`, not 16."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: deque[tuple[asyncio.Queue[Event], Event]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, target: asyncio.Queue[Event], event: Event) -> None:  # engine thread
        with self._lock:
            self._pending.append((target, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # event loop
        with self._lock:
            items, self._pending = self._pending, deque()
            self._scheduled = False
        for target, event in items:
            target.put_nowait(event)


_dispatchers: dict[asyncio.AbstractEventLoop, _Dispatcher] = {}


def _dispatcher(loop: asyncio.AbstractEventLoop) -> _Dispatcher:
    d = _dispatchers.get(loop)
    if d is None:
        _dispatchers.clear()  # one live loop per process; drop a closed one's
        d = _dispatchers[loop] = _Dispatcher(loop)
    return d


class EventStream:
    """Submits a request and exposes its events to one asyncio consumer; cancels it if the consumer leaves."""

    def __init__(self, engine: ServingEngine, req: EngineRequest) -> None:
        self.engine, self.req = engine, req
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.done = False
        dispatcher = _dispatcher(asyncio.get_running_loop())
        queue = self._queue

        def sink(event: Event) -> None:
            dispatcher.post(queue, event)

        engine.submit(req, sink)
        note_request(engine, req.request_id)

    async def next(self) -> Event:
        event = await self._queue.get()
        if isinstance(event, Finished | Failed):
            self.done = True
        return event

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            while not self.done:
                yield await self.next()
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the generation unless it already ended (client gone, consumer error)."""
        if not self.done:
            self.done = True
            self.engine.cancel(self.req.request_id)
            log.info("request %s cancelled (client went away)", self.req.request_id)


async def until_disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(stream: EventStream, request: Request) -> Finished | Failed | None:
    """The final event of a non-streamed request, or None (after cancelling) if the client disconnects first."""
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        while True:
            getter = asyncio.ensure_future(stream.next())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                stream.close()
                return None
            event = getter.result()
            if isinstance(event, Finished | Failed):
                return event
    finally:
        watcher.cancel()


class ChoiceStreams:
    """The `n` generations of one prompt. The first is submitted at once, the others when its first event arrives:
    by then the prompt's full blocks are in the prefix cache, so the others compute only the prompt's last block
    (the sharing vLLM gets by forking after prefill, here from the cache)."""

    def __init__(self, engine: ServingEngine, reqs: Sequence[EngineRequest]) -> None:
        self.engine, self.reqs = engine, list(reqs)
        self.streams = [EventStream(engine, self.reqs[0])]  # raises EngineError if refused

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) as they come; every stream is closed (cancelled if unfinished) at the end."""
        getters: dict[asyncio.Future[Event], int] = {}
        try:
            first = await self.streams[0].next()
            for req in self.reqs[1:]:
                try:
                    self.streams.append(EventStream(self.engine, req))
                except EngineError as e:
                    yield len(self.streams), Failed(req.request_id, e)
                    return
            yield 0, first
            getters = {asyncio.ensure_future(s.next()): i for i, s in enumerate(self.streams) if not s.done}
            while getters:
                done, _ = await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=getters.__getitem__):
                    i = getters.pop(task)
                    yield i, task.result()
                    if not self.streams[i].done:
                        getters[asyncio.ensure_future(self.streams[i].next())] = i
        finally:
            for task in getters:
                task.cancel()
            self.close()

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    async def collect(self, request: Request) -> list[Finished | Failed] | None:
        """Every choice's final event, or None (after cancelling them all) if the client disconnects first."""
        async def finals() -> list[Finished | Failed]:
            out: dict[int, Finished | Failed] = {}
            async for i, event in self.events():
                if isinstance(event, Failed):
                    return [event]
                if isinstance(event, Finished):
                    out[i] = event
            return [out[i] for i in sorted(out)]

        task = asyncio.ensure_future(finals())
        watcher = asyncio.ensure_future(until_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                task.cancel()
                self.close()
                return None
            return task.result()
        finally:
            watcher.cancel()


# Characters JSON leaves raw that line readers built on `str.splitlines` (httpx's `iter_lines`, many others) take for
# line breaks, cutting an event in two; escaped, the event stays one line for every reader.
_LINE_BREAKERS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event carrying `data` (a dict is sent as compact UTF-8 JSON)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload.translate(_LINE_BREAKERS)}\n\n"
