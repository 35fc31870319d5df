"""Hooks through which the engine reports what it does; the server turns them into Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass


class Observer:
    """No-op base: override what you export. Called from the engine's loop thread; keep them cheap."""

    def request_queued(self, queue_seconds: float) -> None: ...
    def first_token(self, ttft_seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def request_finished(
        self, e2e_seconds: float, finish_reason: str, prompt_tokens: int, completion_tokens: int
    ) -> None: ...
    def request_cancelled(self) -> None: ...
    def queue_state(self, running: int, waiting: int) -> None: ...
    def step(
        self, running: int, waiting: int, batch_size: int, prefill_seconds: float, decode_seconds: float
    ) -> None: ...
    def vision(self, encoder_seconds: float, images: int, hits: int, misses: int) -> None: ...
    def audio(self, encoder_seconds: float, clips: int) -> None: ...
    def kv_cache(self, usage: float, prefix_queries: int, prefix_hits: int, preemptions: int) -> None:
        """After each step: the share of KV blocks in use, and the increments since the last call."""


@dataclass
class EngineCounters:
    """Plain totals, always kept (tests and `bench` read them)."""

    requests_finished: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0
    decode_forwards: int = 0
    prefill_forwards: int = 0
    compiled_prefill_forwards: int = 0  # of them, through the compiled graph
    encoder_calls: int = 0
    images_encoded: int = 0
    vision_cache_hits: int = 0
    vision_cache_misses: int = 0
    max_batch_size: int = 0
    decode_tokens: int = 0  # sum of decode batch sizes: mean batch = decode_tokens / decode_forwards
