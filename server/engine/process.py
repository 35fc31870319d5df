"""The engine core in a child process: pickled requests in, pickled events out.

This is the seam a distributed runtime places the engine at: the parent never touches the model; the child loads
it from a checkpoint directory, builds an `EngineCore` and steps it whenever it has work. Requests (`EngineRequest`,
tensors included) and events (`TextDelta`, `Finished`, `Failed`) are plain picklable data.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import EngineConfig
from .requests import EngineError, EngineRequest, Event, Failed, Finished, Unavailable

if TYPE_CHECKING:
    import multiprocessing.queues

    # A process queue of (kind, payload) pairs. In: ("submit", EngineRequest), ("abort", request id) or ("stop",
    # None); out: ("ready", max_model_len), then ("events", [Event, ...]).
    Channel = multiprocessing.queues.Queue[tuple[str, Any]]

log = logging.getLogger(__name__)


def _serve(checkpoint: str, config: EngineConfig, model_id: str, dtype: str, inbox: Channel, outbox: Channel
           ) -> None:
    import torch

    from vlmserve.model.tokenizer import ChatTokenizer
    from vlmserve.model.weights import load_model

    from .core import EngineCore

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load_model(checkpoint, dtype=getattr(torch, dtype))
    core = EngineCore(model, ChatTokenizer.from_pretrained(checkpoint), config, model_id=model_id)
    outbox.put(("ready", core.max_model_len))
    with torch.inference_mode():
        while True:
            try:  # wait for a command only when there is nothing to step
                cmd, arg = inbox.get_nowait() if core.has_work() else inbox.get()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd == "stop":
                    return
                events: list[Event] = []
                if cmd == "submit":
                    try:
                        core.add(core.make_sequence(arg))
                    except EngineError as e:
                        events.append(Failed(arg.request_id, e))
                elif cmd == "abort":
                    events = core.abort(arg)
                if events:
                    outbox.put(("events", events))
                try:
                    cmd, arg = inbox.get_nowait()
                except queue.Empty:
                    cmd = None
            if core.has_work():
                events = core.step()
                if events:
                    outbox.put(("events", events))


class EngineProcess:
    """An `EngineCore` over a checkpoint, running in a spawned child process."""

    def __init__(self, checkpoint: str | Path, config: EngineConfig | None = None, *, model_id: str = "model",
                 dtype: str = "float32", timeout: float = 120.0) -> None:
        ctx = mp.get_context("spawn")
        self._inbox, self._outbox = ctx.Queue(), ctx.Queue()
        self._process = ctx.Process(target=_serve, name="vlmserve-engine-core", daemon=True,
                                    args=(str(checkpoint), config or EngineConfig(), model_id, dtype, self._inbox,
                                          self._outbox))
        self._process.start()
        kind, self.max_model_len = self._outbox.get(timeout=timeout)
        assert kind == "ready"

    def submit(self, req: EngineRequest) -> None:
        self._inbox.put(("submit", req))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def events(self, timeout: float = 60.0) -> Iterator[Event]:
        """Events as the child sends them (every request's, in order)."""
        while True:
            try:
                _, events = self._outbox.get(timeout=timeout)
            except queue.Empty:
                if not self._process.is_alive():
                    raise Unavailable("the engine process died") from None
                raise
            yield from events

    def run(self, requests: list[EngineRequest], timeout: float = 60.0) -> dict[str, list[Event]]:
        """Submit all, then collect every request's events until each has finished or failed."""
        for req in requests:
            self.submit(req)
        out: dict[str, list[Event]] = {r.request_id: [] for r in requests}
        open_ids = set(out)
        for event in self.events(timeout):
            out.setdefault(event.request_id, []).append(event)
            if isinstance(event, Finished | Failed):
                open_ids.discard(event.request_id)
                if not open_ids:
                    return out
        return out

    def close(self) -> None:
        if self._process.is_alive():
            self._inbox.put(("stop", None))
            self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
