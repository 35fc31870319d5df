"""One engine replica: a Ray Serve deployment that owns a model and an engine, and streams a request's events.

The replica loads exactly as one `vlmserve serve` process does (`ServerState.load`: weights, tokenizer, engine,
warm-up), then takes prepared `EngineRequest`s from the ingress (images as checked bytes: leased from its cache or
preprocessed here). `generate` yields lists of engine events, the last one final, each with the replica's rank (the
ingress's `x-vlmserve-replica` header). If the caller goes away (a client hung up, the ingress cancelled), Serve
cancels the generator and the request is cancelled in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import torch
from prometheus_client import generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle

from vlmserve.model.image_decode import ImageError

from ..engine.requests import BadRequest, EngineError, EngineRequest, Event, Failed, Finished
from ..settings import Settings
from ..state import ServerState

log = logging.getLogger(__name__)
METRICS_PUSH_S = 2.0


def replica_rank() -> int:
    """This replica's stable rank in its deployment (a replacement takes over the rank of the one it replaces)."""
    rank: Any = serve.get_replica_context().rank
    return int(rank if isinstance(rank, int) else rank.rank)


class EngineReplica:
    """The engine side of the Serve application (deployed by server/scale/app.py)."""

    def __init__(self, settings: dict[str, Any], board: DeploymentHandle[Any] | None = None) -> None:
        self.settings = Settings(**settings)
        self.rank = replica_rank()
        torch.set_num_threads(max(1, round(self.settings.replica_cpus)))
        self.state = ServerState(self.settings)
        loader = threading.Thread(target=self._load, name="vlmserve-load")  # a thread that ends: see in_fresh_thread
        loader.start()
        loader.join()
        if self.state.load_error is not None:
            raise RuntimeError(f"replica {self.rank} failed to load") from self.state.load_error
        self.board = board
        self._pusher: asyncio.Task[None] | None = None
        log.info("replica %d ready", self.rank)

    def _load(self) -> None:
        with contextlib.suppress(BaseException):  # kept in state.load_error, raised by __init__
            self.state.load()

    def info(self) -> dict[str, int]:
        """What the ingress sizes requests by."""
        engine = self._engine()
        return {"rank": self.rank, "max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size}

    def _engine(self) -> Any:
        assert self.state.engine is not None
        return self.state.engine

    async def check_health(self) -> None:
        """Serve's health check: a replica whose engine loop died is replaced."""
        if not self._engine().alive:
            raise RuntimeError(f"replica {self.rank}: the engine stopped ({self._engine().error!r})")
        if self.board is not None and self._pusher is None:
            self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())

    async def _push_metrics(self) -> None:
        """Every few seconds, this replica's Prometheus text to the metrics board (the ingress's /metrics)."""
        assert self.board is not None
        while True:
            with contextlib.suppress(Exception):
                await self.board.put.remote(self.rank, generate_latest(self.state.metrics.registry).decode())
            await asyncio.sleep(METRICS_PUSH_S)

    async def generate(self, req: EngineRequest, affinity_key: str = "") -> AsyncIterator[tuple[int, list[Event]]]:
        """(rank, [Event, ...]) items until a final event: the rank (the ingress's `x-vlmserve-replica` header) rides
        on every batch rather than costing a message of its own. `affinity_key` is the router's
        (server/scale/router.py); the replica itself does not read it."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        engine = self._engine()
        try:
            if any(img.deferred is not None for img in req.images):
                req = await loop.run_in_executor(self.state.executor, self._resolve_images, req)
            engine.submit(req, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        except EngineError as e:
            yield self.rank, [Failed(req.request_id, e)]
            return
        done = False
        try:
            while not done:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                done = any(isinstance(e, Finished | Failed) for e in batch)
                yield self.rank, batch
        finally:
            if not done:
                engine.cancel(req.request_id)

    def _resolve_images(self, req: EngineRequest) -> EngineRequest:
        """The request with its images as bytes (the ingress checked them) leased from this replica's cache of
        visual tokens, or preprocessed here on a miss (a thread of the pool, not the event loop)."""
        preparer, engine = self.state.preparer, self._engine()
        assert preparer is not None
        t0 = time.perf_counter()
        try:
            images = preparer.resolve(req.images, lambda key: engine.lease_image(key, req.cache_salt))
        except ImageError as e:  # the ingress decoded these bytes already: not expected
            raise BadRequest(str(e)) from e
        if any(img.pixel_values is not None for img in images):  # not a lease only: pixel work was done here
            self.state.metrics.preprocess.observe(time.perf_counter() - t0)
        return replace(req, images=images)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.state.close()
