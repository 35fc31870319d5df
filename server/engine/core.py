"""The engine: one thread owns the model and the device; every running sequence advances in one batched step.

Requests arrive tokenized, with their images already decoded and preprocessed (by the caller, off this loop).
Each loop iteration:
  1. applies commands (new requests, cancellations) from a thread-safe queue;
  2. admits waiting requests into free KV slots, encodes their images that are not yet in the visual-token cache
     (several images per encoder call) and prefills them together in one right-padded forward;
  3. runs one batched decode forward for every running sequence, samples (one host sync: reading the ids),
     detokenizes, matches stop strings and retires finished sequences, freeing their slots at once.

KV memory is a set of fixed slots (`KVCache`), each holding a whole context. Slots keep the step simple and
allocation-free, and make admission exact (a free slot is all a request needs); the price is memory reserved for
the longest context per slot, which is why `max_running` and `max_model_len` are settings.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from vlmserve.model.cache import KVCache
from vlmserve.model.generation import decode_step, prefill, prompt_embeddings
from vlmserve.model.serving_weights import Layout, prepare_for_serving
from vlmserve.model.tokenizer import ChatTokenizer, IncrementalDetokenizer
from vlmserve.model.vlm import VisionLanguageModel

from .observer import EngineCounters, Observer
from .requests import (
    BadRequest,
    ContextTooLong,
    EngineError,
    EngineRequest,
    Event,
    EventSink,
    Failed,
    Finished,
    InternalError,
    QueueFull,
    TextDelta,
    Unavailable,
    Usage,
)
from .sampler_state import SamplerState
from .stops import StopMatcher
from .vision_cache import VisionCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 16  # KV slots: sequences decoded together
    max_waiting: int = 64  # admitted requests waiting for a slot; past it, QueueFull (429)
    max_model_len: int | None = None  # context per sequence; None: the model's max_position_embeddings, capped
    max_model_len_cap: int = 4096  # cap on the default above (slots reserve memory for a whole context)
    default_max_tokens: int = 1024  # when a request omits max_tokens: the rest of the context, at most this
    max_prefill_tokens: int = 8192  # prompt tokens prefilled in one step (at least one request always goes)
    max_images_per_encode: int = 32  # images per vision encoder call
    vision_cache_bytes: int = 256 * 1024**2
    compile_decode: bool = False  # torch.compile the decode step
    weight_layout: Layout = "auto"  # how the weights are laid out for serving (model/serving_weights.py)


@dataclass
class _Sequence:
    req: EngineRequest
    sink: EventSink
    arrival: float
    prompt_len: int
    max_tokens: int
    slot: int = -1
    length: int = 0  # tokens whose keys/values are in the cache
    pending: int = -1  # the last sampled token, not yet in the cache
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    detok: IncrementalDetokenizer | None = None
    stops: StopMatcher | None = None
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    seed: int = 0
    unpinned: bool = False


class Engine:
    """Continuous-batching generation over one model on one device, driven from any thread.

    The engine owns the model it is given: it lays the weights out for serving (`EngineConfig.weight_layout`,
    model/serving_weights.py), after which the model serves but no longer trains or saves.
    """

    def __init__(
        self,
        model: VisionLanguageModel,
        tokenizer: ChatTokenizer,
        config: EngineConfig | None = None,
        *,
        model_id: str = "model",
        observer: Observer | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.weight_layout = prepare_for_serving(model, layout=self.config.weight_layout,
                                                 max_batch=self.config.max_running)
        self.model_id = model_id
        self.observer = observer or Observer()
        self.counters = EngineCounters()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        text = model.config.text
        natural = min(text.max_position_embeddings, model.language_model.rotary.max_positions)
        self.max_model_len = self.config.max_model_len or min(natural, self.config.max_model_len_cap)
        if self.max_model_len > natural:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's {natural} positions")
        self.num_visual_tokens = model.config.num_visual_tokens
        self.image_token_id = model.config.image_token_index
        self.eos_ids = frozenset(tokenizer.eos_token_ids)
        self.cache = KVCache(
            num_layers=text.num_hidden_layers, num_slots=self.config.max_running, max_len=self.max_model_len,
            num_kv_heads=text.num_key_value_heads, head_dim=text.head_dim, dtype=self.dtype, device=self.device,
        )
        self.vision_cache = VisionCache(self.config.vision_cache_bytes)
        self.sampler = SamplerState(self.config.max_running, model.language_model.lm_head.out_features, self.device)
        self._decode = torch.compile(decode_step, dynamic=True) if self.config.compile_decode else decode_step

        self._commands: queue.Queue[tuple[str, object]] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not yet in a slot (guarded by _lock)
        self._reserved = 0  # places held by requests still being prepared (Engine.reserve; guarded by _lock)
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[str, _Sequence] = {}
        self._free_slots = list(range(self.config.max_running - 1, -1, -1))  # a stack: lowest slot on top
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

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return self._pending

    def drain(self) -> None:
        """Refuse new requests from now on; running and queued ones go on."""
        self._draining = True

    def idle(self) -> bool:
        with self._lock:
            return self._pending == 0 and not self._running

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
    def check_admission(self) -> None:
        """Raise QueueFull / Unavailable if a new request would be refused now (cheap; call before any work)."""
        if not self.alive:
            raise Unavailable("the engine is not running")
        if self._draining:
            raise Unavailable("the server is shutting down")
        with self._lock:  # a free slot takes one more (else --max-waiting 0 would refuse everything)
            if self._pending >= self.config.max_waiting + len(self._free_slots):
                raise QueueFull(f"the queue is full ({self.config.max_waiting} requests waiting)")

    def reserve(self) -> None:
        """`check_admission` that also holds a place until `unreserve()`: requests still being prepared (tokenized,
        images decoded) count against the queue, so that in a burst the surplus is refused before any image work."""
        self.check_admission()
        with self._lock:
            if self._pending + self._reserved >= self.config.max_waiting + len(self._free_slots):
                raise QueueFull(f"the queue is full ({self.config.max_waiting} requests waiting)")
            self._reserved += 1

    def unreserve(self) -> None:
        """Give back a place taken by `reserve()` (once the request is submitted, or refused)."""
        with self._lock:
            self._reserved = max(0, self._reserved - 1)

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None) -> int:
        """The completion budget of a prompt, or ContextTooLong with the numbers."""
        room = self.max_model_len - prompt_len
        if max_tokens is None:
            if room < 1:
                raise ContextTooLong(
                    f"the prompt has {prompt_len} tokens (text and images) but the context is {self.max_model_len}"
                )
            return min(room, self.config.default_max_tokens)
        if max_tokens < 1:
            raise BadRequest("max_tokens must be at least 1")
        if prompt_len + max_tokens > self.max_model_len:
            raise ContextTooLong(
                f"this request needs {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, text and images, "
                f"+ {max_tokens} max_tokens) but the model's context is {self.max_model_len}"
            )
        return max_tokens

    def submit(self, req: EngineRequest, sink: EventSink) -> None:
        """Queue a request; its events go to `sink`, called from the engine thread. Raises EngineError if refused."""
        n_slots = sum(1 for t in req.prompt_ids if t == self.image_token_id)
        if n_slots != len(req.images) * self.num_visual_tokens:
            raise BadRequest(
                f"the prompt has {n_slots} image-token slots but {len(req.images)} images need "
                f"{len(req.images) * self.num_visual_tokens}"
            )
        max_tokens = self.resolve_max_tokens(len(req.prompt_ids), req.max_tokens)
        seq = _Sequence(req=req, sink=sink, arrival=time.monotonic(), prompt_len=len(req.prompt_ids),
                        max_tokens=max_tokens)
        self.check_admission()
        with self._lock:  # free slots count: a reserved request may arrive before the loop fills an idle slot
            if self._pending >= self.config.max_waiting + len(self._free_slots):
                raise QueueFull(f"the queue is full ({self.config.max_waiting} requests waiting)")
            self._pending += 1
        self._commands.put(("submit", seq))

    def pin_image(self, content_hash: str) -> bool:
        """If the image's visual tokens are cached, keep them until a request that carries the image without pixels
        (`ImageInput(content_hash, None)`) has used them, and return True: the caller may skip decoding it. A request
        carrying such a pinned image must then be submitted (or `unpin_image` called)."""
        return self.vision_cache.pin((self.model_id, content_hash))

    def unpin_image(self, content_hash: str) -> None:
        self.vision_cache.unpin((self.model_id, content_hash))

    def cancel(self, request_id: str) -> None:
        """Stop a request (a client went away); its slot is free by the next step."""
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
                if self.config.compile_decode:
                    self._precompile()
                while not self._stopping.is_set():
                    self._apply_commands(block=not (self._waiting or self._running))
                    if self._waiting and self._free_slots:
                        self._admit()
                    if self._running:
                        self._step()
        except BaseException as e:  # the loop itself failed: every request fails, the server must restart
            self.error = e
            log.exception("engine loop died")
        finally:
            self._fail_all(Unavailable("the engine stopped"))

    def _precompile(self) -> None:
        """Compile every variant of the decode step before serving, so that no request waits on a compile.

        The variants: one sequence (size 1 is specialised) and several (dynamic sizes), each with the cache read as
        a view and gathered by slot. Keys written here land in slots no request holds yet and are overwritten or
        masked like any earlier occupant's. Compiled steps always take the masked path (one graph fewer each).
        """
        t0 = time.perf_counter()
        try:
            for batch in sorted({1, min(2, self.config.max_running)}):
                tokens = torch.zeros(batch, dtype=torch.long, device=self.device)  # (B,)
                positions = torch.full((batch,), 2, dtype=torch.long, device=self.device)  # (B,); kv_len 3: not 0/1
                slots = torch.arange(batch, device=self.device).flip(0)  # (B,)
                for read_by_slot in (None, slots):
                    self._decode(self.model, tokens, positions, self.cache, read_by_slot, 3, False)
        except Exception as e:  # no C++ compiler, no Triton, an unsupported op: serve eagerly rather than not at all
            log.warning("torch.compile of the decode step failed (%s: %s); decoding eagerly", type(e).__name__, e)
            self._decode = decode_step
            return
        log.info("decode step compiled in %.1fs", time.perf_counter() - t0)

    def _apply_commands(self, *, block: bool) -> None:
        try:
            cmd, arg = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if cmd == "submit":
                assert isinstance(arg, _Sequence)
                self._waiting.append(arg)
            elif cmd == "cancel":
                self._cancel(str(arg))
            try:
                cmd, arg = self._commands.get_nowait()
            except queue.Empty:
                return

    def _cancel(self, request_id: str) -> None:
        seq = self._running.get(request_id)
        if seq is None:
            seq = next((s for s in self._waiting if s.req.request_id == request_id), None)
            if seq is None:
                return
            self._waiting.remove(seq)
            with self._lock:
                self._pending -= 1
        self.counters.requests_cancelled += 1
        self.observer.request_cancelled()
        self._retire(seq, "cancelled", emit_rest=False)

    # ---------------------------------------------------------------------------------------------- admission
    def _admit(self) -> None:
        batch: list[_Sequence] = []
        budget = self.config.max_prefill_tokens
        while self._waiting and self._free_slots:
            seq = self._waiting[0]
            if batch and seq.prompt_len > budget:
                break
            self._waiting.popleft()
            with self._lock:
                self._pending -= 1
            seq.slot = self._free_slots.pop()
            self._running[seq.req.request_id] = seq
            budget -= seq.prompt_len
            batch.append(seq)
            self.observer.request_queued(time.monotonic() - seq.arrival)
        self.observer.queue_state(len(self._running), self._pending)  # once all free slots are filled
        visual = self._encode_images(batch)
        ready = [s for s in batch if s.req.request_id in visual]
        if ready:
            self._prefill(ready, visual)

    def _encode_images(self, batch: list[_Sequence]) -> dict[str, torch.Tensor | None]:
        """Visual tokens per request (None for text-only), from the cache or from batched encoder calls."""
        t0 = time.perf_counter()
        found: dict[tuple[str, str], torch.Tensor] = {}
        todo: dict[tuple[str, str], torch.Tensor] = {}
        hits = 0
        for seq in batch:
            for img in seq.req.images:
                key = (self.model_id, img.content_hash)
                if key in found or key in todo:
                    hits += 1  # the same image twice in this batch: encoded once
                    continue
                cached = self.vision_cache.get(key)
                if cached is not None:
                    found[key] = cached
                    hits += 1
                elif img.pixel_values is not None:
                    todo[key] = img.pixel_values
        keys = list(todo)
        step = self.config.max_images_per_encode
        for i in range(0, len(keys), step):
            chunk = keys[i : i + step]
            found.update(self._encode_chunk(chunk, [todo[k] for k in chunk]))
        out: dict[str, torch.Tensor | None] = {}
        for seq in batch:
            keys_i = [(self.model_id, img.content_hash) for img in seq.req.images]
            if not keys_i:
                out[seq.req.request_id] = None
            elif all(k in found for k in keys_i):
                out[seq.req.request_id] = torch.stack([found[k] for k in keys_i])  # (N_img, N_vis, D)
            else:
                self._fail(seq, BadRequest("an image of this request could not be encoded"))
            self._unpin(seq)
        self.counters.vision_cache_hits += hits
        self.counters.vision_cache_misses += len(todo)
        if todo or hits:
            self.observer.vision(time.perf_counter() - t0, len(todo), hits, len(todo))
        return out

    def _encode_chunk(
        self, keys: list[tuple[str, str]], pixels: list[torch.Tensor]
    ) -> dict[tuple[str, str], torch.Tensor]:
        """Encode images in one call; on failure retry one by one so that only the bad image is lost."""
        try:
            batch = torch.stack([p.to(self.device, self.dtype, non_blocking=True) for p in pixels])  # (N, C, H, W)
            tokens = self.model.encode_images(batch)  # (N, N_vis, D)
        except Exception:
            if len(keys) == 1:
                log.exception("encoding image %s failed", keys[0][1][:12])
                return {}
            out: dict[tuple[str, str], torch.Tensor] = {}
            for k, p in zip(keys, pixels, strict=True):
                out.update(self._encode_chunk([k], [p]))
            return out
        self.counters.encoder_calls += 1
        self.counters.images_encoded += len(keys)
        out = {}
        for k, t in zip(keys, tokens, strict=True):
            t = t.clone()  # a clone: a slice would pin the whole batch's memory in the cache
            self.vision_cache.put(k, t)
            out[k] = t
        return out

    # ------------------------------------------------------------------------------------------------- prefill
    def _prefill(self, batch: list[_Sequence], visual: dict[str, torch.Tensor | None]) -> None:
        t0 = time.perf_counter()
        try:
            embeds = [prompt_embeddings(self.model, s.req.prompt_ids, visual[s.req.request_id]) for s in batch]
            longest = max(e.shape[0] for e in embeds)
            padded = embeds[0].new_zeros(len(batch), longest, embeds[0].shape[-1])  # (B, T, D)
            for i, e in enumerate(embeds):
                padded[i, : e.shape[0]] = e
            lengths = self._tensor([s.prompt_len for s in batch])  # (B,)
            slots = self._tensor([s.slot for s in batch])  # (B,)
            for s in batch:
                s.seed = self.sampler.assign(s.slot, s.req.sampling, s.req.prompt_ids)
            logits = prefill(self.model, padded, lengths, self.cache, slots)  # (B, V)
            tokens = self.sampler.sample(logits, slots, [0] * len(batch), [s.req.sampling for s in batch])
        except Exception as e:
            log.exception("prefill failed for %d requests", len(batch))
            for s in batch:
                self._fail(s, InternalError(f"prefill failed: {type(e).__name__}"))
            return
        self.counters.prefill_forwards += 1
        for s in batch:
            s.length = s.prompt_len
            s.detok = self.tokenizer.detokenizer(context_ids=s.req.prompt_ids[-4:])
            s.stops = StopMatcher(s.req.stop)
        self._accept(batch, tokens)
        self.observer.step(len(self._running), self.num_waiting, len(batch), time.perf_counter() - t0, 0.0)

    # -------------------------------------------------------------------------------------------------- decode
    def _step(self) -> None:
        batch = sorted((s for s in self._running.values() if s.pending >= 0), key=lambda s: s.slot)
        if not batch:
            return
        t0 = time.perf_counter()
        try:
            tokens = self._tensor([s.pending for s in batch])  # (B,)
            positions = self._tensor([s.length for s in batch])  # (B,)
            slots = self._tensor([s.slot for s in batch])  # (B,)
            # Slots 0..B-1 in order (the common case: slots are handed out lowest first) read the cache as a view;
            # any other set is gathered.
            contiguous = batch[-1].slot == len(batch) - 1
            kv_len = max(s.length for s in batch) + 1
            equal = not self.config.compile_decode and all(s.length == kv_len - 1 for s in batch)
            logits = self._decode(
                self.model, tokens, positions, self.cache, None if contiguous else slots, kv_len, equal
            )  # (B, V)
            steps = [len(s.generated) for s in batch]
            sampled = self.sampler.sample(logits, slots, steps, [s.req.sampling for s in batch])
        except Exception as e:
            log.exception("decode step failed for %d requests", len(batch))
            for s in batch:
                self._fail(s, InternalError(f"decode failed: {type(e).__name__}"))
            return
        for s in batch:
            s.length += 1
        self.counters.steps += 1
        self.counters.decode_forwards += 1
        self.counters.decode_tokens += len(batch)
        self.counters.max_batch_size = max(self.counters.max_batch_size, len(batch))
        self._accept(batch, sampled)
        self.observer.step(len(self._running), self.num_waiting, len(batch), 0.0, time.perf_counter() - t0)

    def _accept(self, batch: list[_Sequence], tokens: list[int]) -> None:
        """Take one sampled token per sequence: stream its text, and retire sequences that are done."""
        now = time.monotonic()
        for seq, token in zip(batch, tokens, strict=True):
            try:
                self._accept_one(seq, token, now)
            except Exception as e:
                log.exception("request %s failed after token %d", seq.req.request_id, token)
                self._fail(seq, InternalError(f"{type(e).__name__} while streaming"))

    def _accept_one(self, seq: _Sequence, token: int, now: float) -> None:
        assert seq.detok is not None and seq.stops is not None
        if not seq.generated:
            seq.first_token_at = now
            self.observer.first_token(now - seq.arrival)
        else:
            self.observer.inter_token(now - seq.last_token_at)
        seq.last_token_at = now
        seq.generated.append(token)
        if (token in self.eos_ids and not seq.req.ignore_eos) or token in seq.req.stop_token_ids:
            self._retire(seq, "stop")
            return
        text, hit = seq.stops.push(seq.detok.push(token))
        if text:
            seq.text.append(text)
            seq.sink(TextDelta(seq.req.request_id, text, (token,)))
        if hit:
            self._retire(seq, "stop", emit_rest=False)
        elif len(seq.generated) >= seq.max_tokens or seq.length + 1 >= self.max_model_len:
            self._retire(seq, "length")
        else:
            seq.pending = token

    # ----------------------------------------------------------------------------------------------- retiring
    def _retire(self, seq: _Sequence, reason: str, *, emit_rest: bool = True) -> None:
        if emit_rest and seq.detok is not None and seq.stops is not None:
            rest, hit = seq.stops.push(seq.detok.flush())
            rest += "" if hit else seq.stops.flush()
            if rest:
                seq.text.append(rest)
                seq.sink(TextDelta(seq.req.request_id, rest, ()))
        self._release(seq)
        usage = Usage(seq.prompt_len, len(seq.generated))
        if reason != "cancelled":
            self.counters.requests_finished += 1
            self.counters.prompt_tokens += usage.prompt_tokens
            self.counters.completion_tokens += usage.completion_tokens
            self.observer.request_finished(time.monotonic() - seq.arrival, reason, usage.prompt_tokens,
                                           usage.completion_tokens)
        self._emit(seq, Finished(seq.req.request_id, reason, usage, "".join(seq.text), tuple(seq.generated)))

    def _fail(self, seq: _Sequence, error: EngineError) -> None:
        self._release(seq)
        self.counters.requests_failed += 1
        self._emit(seq, Failed(seq.req.request_id, error))

    def _unpin(self, seq: _Sequence) -> None:
        """Release the cache pins the HTTP layer took for this request's undecoded images (once)."""
        if not seq.unpinned:
            seq.unpinned = True
            for img in seq.req.images:
                if img.pixel_values is None:
                    self.vision_cache.unpin((self.model_id, img.content_hash))

    def _release(self, seq: _Sequence) -> None:
        self._unpin(seq)
        if self._running.pop(seq.req.request_id, None) is not None:
            self._free_slots.append(seq.slot)
            self._free_slots.sort(reverse=True)  # hand out the lowest free slot next: batches stay contiguous
        seq.pending = -1
        self.observer.queue_state(len(self._running), self._pending)

    def _emit(self, seq: _Sequence, event: Event) -> None:
        try:
            seq.sink(event)
        except Exception:
            log.exception("event sink of %s failed", seq.req.request_id)

    def _fail_all(self, error: EngineError) -> None:
        for seq in list(self._running.values()):
            self._fail(seq, error)
        while self._waiting:
            self._fail(self._waiting.popleft(), error)
        while True:
            try:
                cmd, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd == "submit" and isinstance(arg, _Sequence):
                self._fail(arg, error)
        with self._lock:
            self._pending = 0

    def _tensor(self, values: list[int]) -> torch.Tensor:
        """A small int64 tensor on the device, copied without blocking the host on CUDA."""
        t = torch.tensor(values, dtype=torch.long)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)
