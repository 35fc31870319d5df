"""Prometheus metrics. Names follow vLLM's where one exists, under our own `vlmserve:` prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .engine.observer import Observer

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)


class Metrics(Observer):
    """The engine's observer and the HTTP layer's counters, in one registry per app."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("vlmserve:time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("vlmserve:inter_token_latency_seconds", "Time between tokens", registry=r,
                             buckets=_ITL_BUCKETS)
        self.e2e = Histogram("vlmserve:e2e_request_latency_seconds", "Request latency, arrival to last token",
                             registry=r, buckets=_LATENCY_BUCKETS)
        self.queue_time = Histogram("vlmserve:request_queue_time_seconds", "Time waiting for a KV slot", registry=r,
                                    buckets=_LATENCY_BUCKETS)
        self.running = Gauge("vlmserve:num_requests_running", "Sequences in the decode batch", registry=r)
        self.waiting = Gauge("vlmserve:num_requests_waiting", "Requests waiting for a slot", registry=r)
        self.batch = Histogram("vlmserve:batch_size", "Sequences per forward", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.prefill_time = Histogram("vlmserve:prefill_seconds", "Prefill forward time", registry=r,
                                      buckets=_LATENCY_BUCKETS)
        self.decode_time = Histogram("vlmserve:decode_step_seconds", "Decode step time", registry=r,
                                     buckets=_ITL_BUCKETS)
        self.prompt_tokens = Counter("vlmserve:prompt_tokens", "Prompt tokens processed (text and image)", registry=r)
        self.generation_tokens = Counter("vlmserve:generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("vlmserve:request_success", "Finished requests by reason", ["finished_reason"],
                                registry=r)
        self.cancelled = Counter("vlmserve:request_cancelled", "Requests cancelled (client went away)", registry=r)
        self.http = Counter("vlmserve:http_requests", "HTTP requests by route and status", ["route", "status"],
                            registry=r)
        self.preprocess = Histogram("vlmserve:image_preprocess_seconds", "Image decode + preprocess time",
                                    registry=r, buckets=_LATENCY_BUCKETS)
        self.encoder = Histogram("vlmserve:vision_encoder_seconds", "Vision stage time per admission batch",
                                 registry=r, buckets=_LATENCY_BUCKETS)
        self.images = Counter("vlmserve:vision_images_encoded", "Images run through the encoder", registry=r)
        self.cache_hits = Counter("vlmserve:vision_cache_hits", "Visual-token cache hits", registry=r)
        self.cache_misses = Counter("vlmserve:vision_cache_misses", "Visual-token cache misses", registry=r)
        self.audio_preprocess = Histogram("vlmserve:audio_preprocess_seconds", "Audio decode + features time",
                                          registry=r, buckets=_LATENCY_BUCKETS)
        self.audio_encoder = Histogram("vlmserve:audio_encoder_seconds", "Audio encoder time per admission batch",
                                       registry=r, buckets=_LATENCY_BUCKETS)
        self.audio_clips = Counter("vlmserve:audio_clips_encoded", "Audio clips run through the encoder", registry=r)
        self.audio_cache_hits = Counter("vlmserve:audio_cache_hits", "Clips served from the audio-token cache, not "
                                        "decoded", registry=r)
        self.audio_cache_misses = Counter("vlmserve:audio_cache_misses", "Clips decoded (not in the audio-token "
                                          "cache)", registry=r)
        self.kv_usage = Gauge("vlmserve:kv_cache_usage_perc", "Share of KV blocks in use (1 = full)", registry=r)
        self.prefix_queries = Counter("vlmserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("vlmserve:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                   registry=r)
        self.preemptions = Counter("vlmserve:num_preemptions", "Sequences preempted for want of KV blocks",
                                   registry=r)

    # -- engine hooks (engine thread) ----------------------------------------------------------------------------
    def request_queued(self, queue_seconds: float) -> None:
        self.queue_time.observe(queue_seconds)

    def first_token(self, ttft_seconds: float) -> None:
        self.ttft.observe(ttft_seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def request_finished(
        self, e2e_seconds: float, finish_reason: str, prompt_tokens: int, completion_tokens: int
    ) -> None:
        self.e2e.observe(e2e_seconds)
        self.finished.labels(finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)

    def request_cancelled(self) -> None:
        self.cancelled.inc()

    def queue_state(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def step(
        self, running: int, waiting: int, batch_size: int, prefill_seconds: float, decode_seconds: float
    ) -> None:
        self.queue_state(running, waiting)
        self.batch.observe(batch_size)
        if prefill_seconds:
            self.prefill_time.observe(prefill_seconds)
        if decode_seconds:
            self.decode_time.observe(decode_seconds)

    def vision(self, encoder_seconds: float, images: int, hits: int, misses: int) -> None:
        self.encoder.observe(encoder_seconds)
        self.images.inc(images)
        self.cache_hits.inc(hits)
        self.cache_misses.inc(misses)

    def audio(self, encoder_seconds: float, clips: int) -> None:
        self.audio_encoder.observe(encoder_seconds)
        self.audio_clips.inc(clips)

    def kv_cache(self, usage: float, prefix_queries: int, prefix_hits: int, preemptions: int) -> None:
        self.kv_usage.set(usage)
        if prefix_queries:
            self.prefix_queries.inc(prefix_queries)
        if prefix_hits:
            self.prefix_hits.inc(prefix_hits)
        if preemptions:
            self.preemptions.inc(preemptions)
