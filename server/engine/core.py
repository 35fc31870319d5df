"""The engine core: a step is schedule, execute, update (nano-vllm's `LLMEngine.step`).

    batch = scheduler.schedule()        which sequences advance by how many tokens (decodes, prefill chunks)
    out = runner.execute(batch)         images the step needs -> encoder; one LM forward; sampling
    events = update(batch, out)         cache bookkeeping, detokenize, stops, finished sequences free their blocks

The core is single-threaded and knows nothing of threads, sinks or HTTP: requests go in (`add`), events come out of
`step`. `Engine` (engine.py) drives it from a thread for the server; `EngineProcess` (process.py) runs it in a
child process with pickled requests in and events out.
"""

from __future__ import annotations

import logging
import time

import torch

from vlmserve.model.kv_cache import PagedKVCache, bytes_per_block
from vlmserve.model.serving_weights import prepare_for_serving
from vlmserve.model.tokenizer import ChatTokenizer
from vlmserve.model.vlm import VisionLanguageModel

from .config import CPU_KV_CACHE_MB, CUDA_KV_CACHE_SHARE, EngineConfig
from .kv_cache_manager import KVCacheManager, root_key
from .model_runner import ModelRunner, StepOutput
from .observer import EngineCounters, Observer
from .output_processor import OutputProcessor
from .requests import BadRequest, ContextTooLong, EngineError, EngineRequest, Event, InternalError
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence, image_spans
from .structured import StructuredOutputs
from .vision_cache import VisionCache

log = logging.getLogger(__name__)


class EngineCore:
    """Continuous batching over one model on one device, one step at a time (not thread-safe: one caller)."""

    def __init__(self, model: VisionLanguageModel, tokenizer: ChatTokenizer, config: EngineConfig | None = None, *,
                 model_id: str = "model", observer: Observer | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.model = model.eval().requires_grad_(False)  # serving only: no step ever records autograd
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.observer = observer or Observer()
        self.counters = EngineCounters()
        self.weight_layout = prepare_for_serving(model, layout=config.weight_layout, max_batch=config.max_running)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        text = model.config.text
        natural = min(text.max_position_embeddings, model.language_model.rotary.max_positions)
        self.max_model_len = config.max_model_len or min(natural, config.max_model_len_cap)
        if self.max_model_len > natural:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's {natural} positions")
        self.image_token_id = model.config.image_token_index
        self.audio_token_id = model.config.audio.audio_token_index if model.config.audio is not None else None
        per_block = bytes_per_block(num_layers=text.num_hidden_layers, block_size=config.block_size,
                                    num_kv_heads=text.num_key_value_heads, head_dim=text.head_dim, dtype=self.dtype)
        num_blocks = self._pool_bytes() // per_block
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"a KV cache of {self._pool_bytes() / 2**20:.0f} MB holds {num_blocks * config.block_size} tokens, "
                f"less than one context of {self.max_model_len}: raise --kv-cache-mb or lower --max-model-len")
        self.kv = PagedKVCache(num_layers=text.num_hidden_layers, num_blocks=num_blocks, block_size=config.block_size,
                               num_kv_heads=text.num_key_value_heads, head_dim=text.head_dim, dtype=self.dtype,
                               device=self.device)
        self.blocks = KVCacheManager(num_blocks, config.block_size,
                                     enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_running=config.max_running,
                                   max_num_batched_tokens=config.max_num_batched_tokens)
        self.vision_cache = VisionCache(int(config.vision_cache_mb * 2**20))
        self.structured = StructuredOutputs(tokenizer, model.language_model.lm_head.out_features)
        self.runner = ModelRunner(model, self.kv, self.vision_cache, max_rows=config.max_running,
                                  max_images_per_encode=config.max_images_per_encode, counters=self.counters,
                                  observer=self.observer, compile_steps=config.compile, structured=self.structured)
        self.output = OutputProcessor(tokenizer, max_model_len=self.max_model_len, counters=self.counters,
                                      observer=self.observer)
        self._by_id: dict[str, Sequence] = {}
        self._reported = (0, 0, 0)  # prefix queries, hits, preemptions already told to the observer
        log.info("KV cache: %d blocks of %d tokens (%.0f MB, %d tokens); %d rows, %d tokens per step",
                 num_blocks, config.block_size, self.kv.nbytes / 2**20, num_blocks * config.block_size,
                 config.max_running, config.max_num_batched_tokens)

    def _pool_bytes(self) -> int:
        if self.config.kv_cache_mb is not None:
            return int(self.config.kv_cache_mb * 2**20)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * CUDA_KV_CACHE_SHARE)
        return CPU_KV_CACHE_MB * 2**20

    # --------------------------------------------------------------------------------------------------- intake
    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None) -> int:
        """The completion budget of a prompt, or ContextTooLong with the numbers."""
        return resolve_max_tokens(self.max_model_len, self.config.max_tokens_default, prompt_len, max_tokens)

    def make_sequence(self, req: EngineRequest) -> Sequence:
        """Validate a request (pure: safe from any thread) and make its sequence. Raises EngineError."""
        try:
            spans = image_spans(req, self.image_token_id, self.audio_token_id)
        except ValueError as e:
            raise BadRequest(str(e)) from e
        max_tokens = self.resolve_max_tokens(len(req.prompt_ids), req.max_tokens)
        seq = Sequence(req=req, arrival=time.monotonic(), max_tokens=max_tokens, spans=spans,
                       root=root_key(self.model_id, req.cache_salt), block_size=self.config.block_size)
        if req.grammar is not None:
            seq.matcher = self.structured.matcher(req.grammar)
        return seq

    def add(self, seq: Sequence) -> None:
        self._by_id[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> list[Event]:
        """Cancel a request; its blocks are free at once."""
        seq = self._by_id.pop(request_id, None)
        events: list[Event] = []
        if seq is not None:
            self.scheduler.finish(seq)
            self.output.finished(seq, "cancelled", events)
            self._report()
        return events

    def fail_all(self, error: EngineError) -> list[Event]:
        events: list[Event] = []
        for seq in list(self._by_id.values()):
            self._fail(seq, error, events)
        return events

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # ----------------------------------------------------------------------------------------------------- step
    @torch.inference_mode()
    def step(self) -> list[Event]:
        batch = self.scheduler.schedule()
        now = time.monotonic()
        for seq in batch.admitted:
            self.runner.assign(seq)  # its sampling settings into its row, before its first sample
            self.observer.request_queued(now - seq.arrival)
        out = self.runner.execute(batch) if batch else None
        return self._update(batch, out)

    def _update(self, batch: ScheduledBatch, out: StepOutput | None) -> list[Event]:
        events: list[Event] = []
        now = time.monotonic()
        if out is not None:
            for seq, error in out.failed:
                self._fail(seq, error, events)
            for seq, n in out.computed:
                self.scheduler.advance(seq, n)
                for index in [i for i in seq.visual if seq.spans[i].end <= seq.num_computed]:
                    del seq.visual[index]  # its keys and values are in the cache now
            for seq, token, logprob in out.sampled:
                try:
                    reason = self.output.accept(seq, token, now, events, logprob)
                except Exception as e:
                    log.exception("request %s failed after token %d", seq.request_id, token)
                    self._fail(seq, InternalError(f"{type(e).__name__} while streaming"), events)
                    continue
                if reason is not None:
                    self._by_id.pop(seq.request_id, None)
                    self.scheduler.finish(seq)
                    self.output.finished(seq, reason, events)
            self.observer.step(self.num_running, len(self.scheduler.waiting), len(batch.items),
                               out.seconds if out.prefill else 0.0, 0.0 if out.prefill else out.seconds)
        self._report()
        return events

    def _fail(self, seq: Sequence, error: EngineError, events: list[Event]) -> None:
        self._by_id.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        self.output.failed(seq, error, events)

    def _report(self) -> None:
        b, s = self.blocks, self.scheduler
        q0, h0, p0 = self._reported
        self.observer.kv_cache(b.usage, b.prefix_queries - q0, b.prefix_hits - h0, s.num_preemptions - p0)
        self._reported = (b.prefix_queries, b.prefix_hits, s.num_preemptions)
        self.observer.queue_state(self.num_running, len(s.waiting))


def resolve_max_tokens(max_model_len: int, default: int, prompt_len: int, max_tokens: int | None) -> int:
    """The completion budget of a prompt in a context of `max_model_len` (`default` when max_tokens is omitted),
    or ContextTooLong with the numbers."""
    room = max_model_len - prompt_len
    if max_tokens is None:
        if room < 1:
            raise ContextTooLong(
                f"the prompt has {prompt_len} tokens (text and images) but the context is {max_model_len}"
            )
        return min(room, default)
    if max_tokens < 1:
        raise BadRequest("max_tokens must be at least 1")
    if prompt_len + max_tokens > max_model_len:
        raise ContextTooLong(
            f"this request needs {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, text and images, "
            f"+ {max_tokens} max_tokens) but the model's context is {max_model_len}"
        )
    return max_tokens
