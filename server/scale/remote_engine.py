"""The ingress's engine: the `ServingEngine` the routes use, with every generation sent to an engine replica.

`submit` starts one asyncio task per request that calls `EngineReplica.generate` through a Serve handle (the
router picks the replica by the request's affinity key) and hands the events to the request's sink. If the replica
dies before the request streamed anything, the request is sent once more (the router has dropped the dead
replica); failing again, or once text has gone out, it ends with `Unavailable` (a 503, or the stream's error
event). Cancelling cancels the remote generator, which cancels the request in that replica's engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Any

import torch
from ray.exceptions import RayError
from ray.serve.exceptions import RequestCancelledError
from ray.serve.handle import DeploymentHandle

from vlmserve.model.tokenizer import ChatTokenizer
from vlmserve.model.vlm import VisionLanguageModel

from ..engine.config import EngineConfig
from ..engine.core import resolve_max_tokens
from ..engine.requests import EngineRequest, EventSink, Failed, Finished, TextDelta, Unavailable, Usage
from ..engine.structured import StructuredOutputs
from .affinity import affinity_key

log = logging.getLogger(__name__)
_RANKS_KEPT = 4096  # ranks of recent requests, read by the response-header middleware


class RemoteEngine:
    """Generation on the engine replicas behind `handle` (a handle to `EngineReplica`)."""

    def __init__(self, handle: DeploymentHandle[Any], model: VisionLanguageModel, tokenizer: ChatTokenizer,
                 config: EngineConfig, info: dict[str, int]) -> None:
        self.handle, self.model, self.config = handle, model, config
        self.max_model_len = info["max_model_len"]
        self._vocab_size = info["vocab_size"]
        self.structured = StructuredOutputs(tokenizer, self._vocab_size)
        self.error: BaseException | None = None
        self._draining = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ranks: OrderedDict[str, asyncio.Future[int | None]] = OrderedDict()

    @property
    def alive(self) -> bool:
        return self.error is None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def num_running(self) -> int:
        return len(self._tasks)

    @property
    def kv_cache_bytes(self) -> int:
        return 0  # the replicas' pools (each one's /metrics reports its usage)

    def drain(self) -> None:
        self._draining = True

    def shutdown(self, *, timeout: float = 30.0) -> None:
        self.drain()

    def check_admission(self) -> None:
        if self._draining:
            raise Unavailable("the server is shutting down")

    def reserve(self) -> None:
        self.check_admission()  # each replica's engine admits (429 when its queue is full)

    def unreserve(self) -> None:
        pass

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None) -> int:
        return resolve_max_tokens(self.max_model_len, self.config.max_tokens_default, prompt_len, max_tokens)

    def compile_grammar(self, grammar: str) -> None:
        self.structured.compile(grammar)

    def lease_image(self, key: str, cache_salt: str = "") -> torch.Tensor | None:
        return None  # visual tokens live in the replicas' caches

    @property
    def defers_images(self) -> bool:
        return True  # the ingress checks an image's bytes; the replica its request lands on leases or prepares it

    def submit(self, req: EngineRequest, sink: EventSink) -> None:
        self.check_admission()
        rank: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._ranks[req.request_id] = rank
        while len(self._ranks) > _RANKS_KEPT:
            self._ranks.popitem(last=False)
        self._tasks[req.request_id] = asyncio.ensure_future(self._run(req, sink, rank))

    def cancel(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    async def replica_rank(self, request_id: str) -> int | None:
        rank = self._ranks.get(request_id)
        return None if rank is None else await asyncio.shield(rank)

    async def _run(self, req: EngineRequest, sink: EventSink, rank: asyncio.Future[int | None]) -> None:
        key = affinity_key(req)
        streamed = False
        try:
            for attempt in (1, 2):
                stream: Any = self.handle.generate.options(stream=True).remote(req, affinity_key=key)
                try:
                    async for replica, payload in stream:
                        if not rank.done():
                            rank.set_result(int(replica))
                        for event in payload:
                            streamed = streamed or isinstance(event, TextDelta)
                            sink(event)
                    return
                except asyncio.CancelledError:
                    stream.cancel()
                    raise
                except (RayError, RequestCancelledError) as e:
                    log.warning("request %s: replica failed (attempt %d, streamed %s): %r", req.request_id,
                                attempt, streamed, e)
                    if streamed or attempt == 2:
                        sink(Failed(req.request_id, Unavailable("the replica serving this request failed")))
                        return
                    if rank.done():
                        rank = asyncio.get_running_loop().create_future()
                        self._ranks[req.request_id] = rank
        except asyncio.CancelledError:
            sink(Finished(req.request_id, "cancelled", Usage(len(req.prompt_ids), 0), ""))
        except Exception as e:  # a fault of ours: that request alone fails
            log.exception("request %s failed in the ingress", req.request_id)
            sink(Failed(req.request_id, Unavailable(f"the ingress failed: {type(e).__name__}")))
        finally:
            self._tasks.pop(req.request_id, None)
            if not rank.done():
                rank.set_result(None)


async def wait_for_replicas(handle: DeploymentHandle[Any], timeout: float) -> dict[str, int]:
    """One replica's `info()` (context length, vocabulary), once the deployment answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            info: dict[str, int] = await handle.info.remote()
            return info
        except RayError:
            if loop.time() > deadline:
                raise
            with contextlib.suppress(Exception):
                await asyncio.sleep(0.5)
