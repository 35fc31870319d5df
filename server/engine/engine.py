"""The engine as the server uses it: the core (core.py) driven by one thread that owns the model and the device.

Requests arrive tokenized, with their images already decoded and preprocessed (by the caller, off this loop). The
loop applies commands (new requests, cancellations) from a thread-safe queue, then runs one core step and hands each
event to its request's sink. Admission (`reserve`, `submit`) is answered on the caller's thread, before any image
work, from counters that the loop keeps current.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator

import torch

from vlmserve.model.tokenizer import ChatTokenizer
from vlmserve.model.vlm import VisionLanguageModel

from .config import EngineConfig
from .core import EngineCore
from .observer import Observer
from .requests import EngineError, EngineRequest, Event, EventSink, Failed, Finished, QueueFull, Unavailable
from .sequence import Sequence

log = logging.getLogger(__name__)
# What a command to the engine thread carries: ("submit", (sequence, sink)), ("cancel", request id), ("wake", None)
_CommandArg = tuple[Sequence, EventSink] | str | None


class Engine:
    """Continuous-batching generation over one model on one device, driven from any thread.

    The engine owns the model it is given: it lays the weights out for serving (`EngineConfig.weight_layout`,
    model/serving_weights.py), after which the model serves but no longer trains or saves.

    On a CPU, do the torch work before `start()` (loading, building the engine) in a thread that then ends, as the
    server does (`server/state.py: in_fresh_thread`): a thread that ran parallel torch work and lives on keeps its
    own OpenMP team, and with more team threads than cores every parallel op of the engine's thread slows down.
    """

    def __init__(self, model: VisionLanguageModel, tokenizer: ChatTokenizer, config: EngineConfig | None = None, *,
                 model_id: str = "model", observer: Observer | None = None) -> None:
        self.core = EngineCore(model, tokenizer, config, model_id=model_id, observer=observer)
        self.config, self.model, self.tokenizer = self.core.config, model, tokenizer
        self.model_id, self.observer, self.counters = model_id, self.core.observer, self.core.counters
        self.max_model_len, self.weight_layout = self.core.max_model_len, self.core.weight_layout
        self.vision_cache = self.core.vision_cache
        self._commands: queue.Queue[tuple[str, _CommandArg]] = queue.Queue()
        self._sinks: dict[str, EventSink] = {}
        self._lock = threading.RLock()
        self._in_flight = 0  # submitted, not yet handed to the core (guarded by _lock)
        self._reserved = 0  # places held by requests still being prepared (guarded by _lock)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._draining = False
        self.error: BaseException | None = None  # set if the loop itself died

    # ------------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="vlmserve-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def compile_grammar(self, grammar: str) -> None:
        """Validate and compile an output grammar ahead of `submit` (blocking; BadRequest if unusable)."""
        self.core.structured.compile(grammar)

    @property
    def vocab_size(self) -> int:
        """Token ids the model scores (logit_bias keys are checked against it)."""
        return self.model.language_model.lm_head.out_features

    @property
    def kv_cache_bytes(self) -> int:
        """The KV block pool's size."""
        return int(self.core.kv.nbytes)

    async def replica_rank(self, request_id: str) -> int | None:
        """The replica that serves `request_id`: one process is replica 0 (server/scale/ has others)."""
        return 0

    @property
    def num_running(self) -> int:
        return self.core.num_running

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return self._in_flight + self.core.scheduler.num_new_waiting

    def drain(self) -> None:
        """Refuse new requests from now on; running and queued ones go on."""
        self._draining = True

    def idle(self) -> bool:
        with self._lock:
            return self._in_flight == 0 and not self.core.has_work()

    def shutdown(self, *, timeout: float = 30.0) -> None:
        """Drain (up to `timeout` seconds for in-flight requests), then stop the loop; leftovers fail with 503."""
        self.drain()
        deadline = time.monotonic() + timeout
        while self.alive and not self.idle() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stopping.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --------------------------------------------------------------------------------------------------- intake
    def _room(self) -> int:
        """Requests the queue takes beyond those already in it (free rows count: each takes one more)."""
        return self.config.max_waiting + len(self.core.scheduler.free_rows) - self.num_waiting

    def check_admission(self) -> None:
        """Raise QueueFull / Unavailable if a new request would be refused now (cheap; call before any work)."""
        if not self.alive:
            raise Unavailable("the engine is not running")
        if self._draining:
            raise Unavailable("the server is shutting down")
        if self._room() <= 0:
            raise QueueFull(f"the queue is full ({self.config.max_waiting} requests waiting)")

    def reserve(self) -> None:
        """`check_admission` that also holds a place until `unreserve()`: requests still being prepared (tokenized,
        images decoded) count against the queue, so that in a burst the surplus is refused before any image work."""
        self.check_admission()
        with self._lock:
            if self._reserved >= self._room():
                raise QueueFull(f"the queue is full ({self.config.max_waiting} requests waiting)")
            self._reserved += 1

    def unreserve(self) -> None:
        """Give back a place taken by `reserve()` (once the request is submitted, or refused)."""
        with self._lock:
            self._reserved = max(0, self._reserved - 1)

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None) -> int:
        """The completion budget of a prompt, or ContextTooLong with the numbers."""
        return self.core.resolve_max_tokens(prompt_len, max_tokens)

    def submit(self, req: EngineRequest, sink: EventSink) -> None:
        """Queue a request; its events go to `sink`, called from the engine thread. Raises EngineError if refused."""
        seq = self.core.make_sequence(req)
        self.check_admission()
        with self._lock:
            self._in_flight += 1
        self._commands.put(("submit", (seq, sink)))

    def lease_image(self, key: str, cache_salt: str = "") -> torch.Tensor | None:
        """The cached visual tokens of an image (by `ImageInput.key`), or None. A caller that gets them may skip
        decoding the image and submit `ImageInput(key, None, n, visual_tokens=tokens)`: the request holds them."""
        return self.vision_cache.get((cache_salt, key))

    @property
    def defers_images(self) -> bool:
        return False  # images come preprocessed (or leased): this process holds the caches

    def cancel(self, request_id: str) -> None:
        """Stop a request (a client went away); its blocks are free by the next step."""
        self._commands.put(("cancel", request_id))

    def generate(self, req: EngineRequest) -> Iterator[Event]:
        """Submit and yield the request's events until it ends (blocking; for scripts, tests, benchmarks)."""
        events: queue.Queue[Event] = queue.Queue()
        self.submit(req, events.put)
        try:
            while True:
                event = events.get()
                yield event
                if isinstance(event, Finished | Failed):
                    return
        finally:
            self.cancel(req.request_id)

    # ----------------------------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping.is_set():
                    self._apply_commands(block=not self.core.has_work())
                    if self.core.has_work():
                        self._dispatch(self.core.step())
        except BaseException as e:  # the loop itself failed: every request fails, the server must restart
            self.error = e
            log.exception("engine loop died")
        finally:
            self._fail_all(Unavailable("the engine stopped"))

    def _apply_commands(self, *, block: bool) -> None:
        try:
            cmd, arg = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if cmd == "submit":
                assert isinstance(arg, tuple)
                seq, sink = arg
                self._sinks[seq.request_id] = sink
                self.core.add(seq)
                with self._lock:
                    self._in_flight -= 1
            elif cmd == "cancel":
                self._dispatch(self.core.abort(str(arg)))
            try:
                cmd, arg = self._commands.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            final = isinstance(event, Finished | Failed)
            sink = self._sinks.pop(event.request_id, None) if final else self._sinks.get(event.request_id)
            if sink is None:
                continue
            try:
                sink(event)
            except Exception:
                log.exception("event sink of %s failed", event.request_id)

    def _fail_all(self, error: EngineError) -> None:
        self._dispatch(self.core.fail_all(error))
        while True:
            try:
                cmd, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd == "submit":
                assert isinstance(arg, tuple)
                seq, sink = arg
                try:
                    sink(Failed(seq.request_id, error))
                except Exception:
                    log.exception("event sink of %s failed", seq.request_id)
        with self._lock:
            self._in_flight = 0
