"""The engine: continuous batching gives each request exactly what it gets alone, and what transformers gives."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlmserve.model import kernels
from vlmserve.model.images import ImageProcessor
from vlmserve.model.sampling import SamplingParams
from vlmserve.model.tokenizer import ChatTokenizer
from vlmserve.model.weights import load_model
from vlmserve.server.engine import (
    BadRequest,
    ContextTooLong,
    Engine,
    EngineConfig,
    EngineRequest,
    Failed,
    Finished,
    ImageInput,
    QueueFull,
    TextDelta,
)
from vlmserve.server.engine.prepare import RequestPreparer
from vlmserve.server.engine.stops import StopMatcher

QUESTIONS = ["what color is the circle?", "how many shapes are there?", "describe the image", "is there a red square?"]


def _png(seed: int, size: tuple[int, int] = (40, 50)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _messages(text: str, n_images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


class Harness:
    def __init__(self, ckpt: Path, **config: object) -> None:
        self.ckpt = ckpt
        self.model = load_model(ckpt)
        self.tokenizer = ChatTokenizer.from_pretrained(ckpt)
        self.preparer = RequestPreparer(
            self.tokenizer, ImageProcessor.from_pretrained(ckpt), self.model.config.num_visual_tokens
        )
        config.setdefault("compile", False)  # eager unless a test asks (compiling costs seconds per engine)
        self.engine = Engine(self.model, self.tokenizer, EngineConfig(**config), model_id=ckpt.name).start()

    def request(self, i: int, *, max_tokens: int = 32, seed: int | None = None, temperature: float = 0.0,
                **kw: object) -> EngineRequest:
        sampling = SamplingParams(temperature=temperature, top_p=0.9 if temperature else 1.0, seed=seed)
        return self.preparer.request(f"req-{i}-{time.monotonic_ns()}", _messages(QUESTIONS[i % 4]), [_png(i)],
                                     sampling=sampling, max_tokens=max_tokens, **kw)

    def run_concurrently(self, requests: list[EngineRequest]) -> list[Finished]:
        out: list[Finished | None] = [None] * len(requests)

        def one(k: int) -> None:
            events = list(self.engine.generate(requests[k]))
            assert isinstance(events[-1], Finished), events[-1]
            out[k] = events[-1]

        threads = [threading.Thread(target=one, args=(k,)) for k in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert all(o is not None for o in out)
        return out  # type: ignore[return-value]


@pytest.fixture(scope="module")
def harness(checkpoint_factory) -> Harness:
    h = Harness(checkpoint_factory("clip-llama"), max_running=16, max_waiting=64)
    yield h
    h.engine.shutdown(timeout=5)


def _alone(h: Harness, req: EngineRequest) -> Finished:
    events = list(h.engine.generate(req))
    assert isinstance(events[-1], Finished)
    return events[-1]


def _first_divergence_is_a_tie(hf: LlavaForConditionalGeneration, inputs: dict, got: list[int],
                               want: list[int]) -> bool:
    """Whether two greedy continuations are equal, or part where the oracle's top two logits tie within float
    rounding (the layouts of model/serving_weights.py round differently from PyTorch's default kernels)."""
    for k, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            ids = torch.cat([inputs["input_ids"], torch.tensor([want[:k]], dtype=torch.long)], dim=1)  # (1, T + k)
            with torch.no_grad():
                logits = hf(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0, -1]  # (V,)
            return bool((logits[a] - logits[b]).abs() <= 1e-4 * logits.abs().max())
    return len(got) == len(want)


@pytest.mark.parametrize(("layout", "max_running"), [("standard", 16), ("standard", 5), ("auto", 16)])
def test_sixteen_concurrent_requests_match_alone_and_transformers(checkpoint_factory, layout: str,
                                                                  max_running: int) -> None:
    """Batched, alone and transformers' tokens are the same. Float32 sums in another order (a batch of 16 rather
    than 1 row, another CPU's kernels, the serving layouts' packed weights) may round a top-two tie the other way,
    so a continuation may part from the others only where the oracle's top two logits tie within rounding."""
    h = Harness(checkpoint_factory("clip-llama"), max_running=max_running, weight_layout=layout)
    try:
        requests = [h.request(i, max_tokens=8 + (i * 5) % 25) for i in range(16)]
        together = h.run_concurrently(requests)
        exact = 0
        assert 1 < h.engine.counters.max_batch_size <= max_running  # requests really shared decode steps
        hf = LlavaForConditionalGeneration.from_pretrained(h.ckpt).eval()
        processor = AutoProcessor.from_pretrained(h.ckpt)
        for i, (req, got) in enumerate(zip(requests, together, strict=True)):
            alone = _alone(h, h.request(i, max_tokens=req.max_tokens))
            prompt = processor.apply_chat_template(_messages(QUESTIONS[i % 4]), add_generation_prompt=True)
            inputs = processor(images=[Image.open(io.BytesIO(_png(i)))], text=[prompt], return_tensors="pt")
            assert inputs["input_ids"][0].tolist() == req.prompt_ids
            with torch.no_grad():
                expected = hf.generate(**inputs, max_new_tokens=req.max_tokens, do_sample=False)
            want = expected[0, len(req.prompt_ids) :].tolist()
            assert _first_divergence_is_a_tie(hf, inputs, list(got.token_ids), list(alone.token_ids)), i
            assert _first_divergence_is_a_tie(hf, inputs, list(got.token_ids), want), i
            exact += got.token_ids == alone.token_ids and list(got.token_ids) == want
            assert got.usage.completion_tokens == len(got.token_ids)
            assert got.finish_reason == ("stop" if got.token_ids[-1] in h.tokenizer.eos_token_ids else "length")
        assert exact >= 14  # ties are rare: all 16 are exact on the machine this was written on
    finally:
        h.engine.shutdown(timeout=5)


def test_streamed_deltas_join_to_the_final_text(harness: Harness) -> None:
    events = list(harness.engine.generate(harness.request(3, max_tokens=20)))
    deltas = "".join(e.text for e in events if isinstance(e, TextDelta))
    final = events[-1]
    assert isinstance(final, Finished)
    assert deltas == final.text
    ids = [t for t in final.token_ids if t not in harness.tokenizer.eos_token_ids]
    assert final.text == harness.tokenizer.decode(ids)


def test_seeded_sampling_is_reproducible_in_any_company(harness: Harness) -> None:
    alone = _alone(harness, harness.request(1, seed=1234, temperature=1.0))
    company = [harness.request(i, temperature=1.0, seed=None if i % 2 else i) for i in range(2, 9)]
    mixed = harness.run_concurrently([*company[:3], harness.request(1, seed=1234, temperature=1.0), *company[3:]])
    assert mixed[3].token_ids == alone.token_ids
    other_seed = _alone(harness, harness.request(1, seed=4321, temperature=1.0))
    assert other_seed.token_ids != alone.token_ids


def test_penalties_steer_sampling_per_slot() -> None:
    """Frequency/presence penalties count generated tokens per slot; the repetition penalty covers the prompt."""
    from vlmserve.model.sampler import SamplerState

    state = SamplerState(num_rows=3, vocab=4, device=torch.device("cpu"))
    state.assign(0, SamplingParams(temperature=0.0, frequency_penalty=0.5), prompt_ids=[])
    state.assign(1, SamplingParams(temperature=0.0), prompt_ids=[])
    state.assign(2, SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt_ids=[0])
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]]).repeat(3, 1)
    slots = torch.tensor([0, 1, 2])
    params = [SamplingParams(temperature=0.0, frequency_penalty=0.5), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    picks = [state.sample(logits, slots, [k] * 3, params) for k in range(4)]
    assert [p[0] for p in picks] == [0, 0, 0, 1]  # 3.0, 2.5, 2.0 (ties with token 1: the lower id wins), 1.5
    assert [p[1] for p in picks] == [0, 0, 0, 0]  # no penalty: always the top token
    assert [p[2] for p in picks] == [1, 0, 0, 0]  # 0 is in the prompt (1.5 < 2.0); once 1 is seen too, 1.5 > 1.0


def test_logit_bias_moves_only_its_own_row() -> None:
    from vlmserve.model.sampler import SamplerState

    state = SamplerState(num_rows=3, vocab=4, device=torch.device("cpu"))
    params = [SamplingParams(temperature=0.0, logit_bias=((2, 5.0),)), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, seed=1, logit_bias=((0, -100.0), (1, -100.0), (3, 100.0)))]
    for row, p in enumerate(params):
        state.assign(row, p, prompt_ids=[])
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]]).repeat(3, 1)
    for step in range(3):
        assert state.sample(logits.clone(), torch.tensor([0, 1, 2]), [step] * 3, params) == [2, 0, 3]
    assert state.sample(logits[:1].clone(), torch.tensor([1]), [0], params[1:2]) == [0]  # greedy fast path, no bias
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((1, 101.0),))


def test_cancelling_mid_stream_frees_the_slot(checkpoint_factory) -> None:
    h = Harness(checkpoint_factory("clip-llama"), max_running=1)
    try:
        long = h.request(0, max_tokens=150)
        long.ignore_eos = True
        stream = h.engine.generate(long)
        assert isinstance(next(stream), TextDelta | Finished)
        h.engine.cancel(long.request_id)
        rest = list(stream)
        assert isinstance(rest[-1], Finished) and rest[-1].finish_reason == "cancelled"
        assert rest[-1].usage.completion_tokens < 150
        # The only slot is free again: the next request runs to completion.
        after = _alone(h, h.request(1, max_tokens=5))
        assert after.finish_reason in ("stop", "length")
        assert h.engine.num_running == 0 and h.engine.counters.requests_cancelled == 1
    finally:
        h.engine.shutdown(timeout=5)


def test_repeated_image_skips_the_encoder(harness: Harness) -> None:
    """The same image again: its keys and values come from the prefix cache, so neither encoder nor prefill runs."""
    counters = harness.engine.counters
    first = _alone(harness, harness.request(42, max_tokens=6))
    encoded = counters.images_encoded
    second = _alone(harness, harness.request(42, max_tokens=6))
    assert counters.images_encoded == encoded  # no encoder work for the same bytes
    assert second.usage.cached_tokens >= 16  # at least the image's visual tokens (16 here) were reused
    assert second.token_ids == first.token_ids
    _alone(harness, harness.request(43, max_tokens=6))  # a new image is encoded
    assert counters.images_encoded == encoded + 1


def test_repeated_image_without_prefix_caching_hits_the_visual_token_cache(checkpoint_factory) -> None:
    h = Harness(checkpoint_factory("clip-llama"), max_running=4, enable_prefix_caching=False)
    try:
        counters = h.engine.counters
        first = _alone(h, h.request(42, max_tokens=6))
        encoded, hits = counters.images_encoded, counters.vision_cache_hits
        second = _alone(h, h.request(42, max_tokens=6))
        assert counters.images_encoded == encoded and counters.vision_cache_hits == hits + 1
        assert second.usage.cached_tokens == 0 and second.token_ids == first.token_ids
    finally:
        h.engine.shutdown(timeout=5)


def _boundary_stop(h: Harness) -> tuple[int, str, Finished]:
    """A request and a two-character stop string made of the last char of one token and the first of the next."""
    decode = h.tokenizer.decode
    for i in range(16):
        req = h.request(i, max_tokens=32)
        req.ignore_eos = True
        ref = _alone(h, req)
        ids = list(ref.token_ids)
        for k in range(2, len(ids) - 1):
            left, right = decode([ids[k]]), decode([ids[k + 1]])
            clean = left.isprintable() and right.isprintable() and "\ufffd" not in left + right
            if clean and left and right:
                stop = left[-1] + right[0]
                head = decode(ids[: k + 1])
                if head.endswith(left) and stop not in head and ref.text.find(stop) == len(head) - 1:
                    return i, stop, ref
    raise AssertionError("no clean token boundary found in 16 outputs")


def test_stop_string_across_token_boundary_is_honoured_and_not_emitted(harness: Harness) -> None:
    i, stop, reference = _boundary_stop(harness)
    req = harness.request(i, max_tokens=32, stop=[stop])
    req.ignore_eos = True
    events = list(harness.engine.generate(req))
    final = events[-1]
    assert isinstance(final, Finished) and final.finish_reason == "stop"
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert streamed == final.text == reference.text[: reference.text.find(stop)]
    assert stop not in streamed


def test_stop_matcher_holds_back_partial_matches() -> None:
    m = StopMatcher(["STOP", "xyz"])
    assert m.push("hello S") == ("hello ", False)
    assert m.push("T") == ("", False)
    assert m.push("AR") == ("STAR", False)
    assert m.push(" and x") == (" and ", False)
    assert m.push("yz tail") == ("", True)
    m2 = StopMatcher(["end"])
    assert m2.push("the en") == ("the ", False)
    assert m2.flush() == "en"


def test_a_bad_image_fails_only_its_request(harness: Harness) -> None:
    good = [harness.request(i, max_tokens=6) for i in range(3)]
    bad = harness.request(7, max_tokens=6)
    bad.images = [ImageInput(key="broken-shape", pixel_values=torch.zeros(3, 5, 5), num_tokens=16)]
    results: dict[str, object] = {}

    def run(req: EngineRequest) -> None:
        results[req.request_id] = list(harness.engine.generate(req))[-1]

    threads = [threading.Thread(target=run, args=(r,)) for r in [*good, bad]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert isinstance(results[bad.request_id], Failed)
    assert all(isinstance(results[r.request_id], Finished) for r in good)
    assert harness.engine.alive
    assert _alone(harness, harness.request(8, max_tokens=4)).finish_reason in ("stop", "length")


def test_admission_refuses_fast_with_reasons(checkpoint_factory) -> None:
    h = Harness(checkpoint_factory("clip-llama"), max_running=1, max_waiting=2, max_model_len=80)
    try:
        with pytest.raises(ContextTooLong, match=r"needs 146 tokens \(46 in the prompt.*\+ 100 max_tokens\).* 80"):
            h.engine.submit(h.request(0, max_tokens=100), lambda e: None)
        wrong = h.request(0, max_tokens=4)
        wrong.images = []
        with pytest.raises(BadRequest, match="16 image-token slots but 0 images"):
            h.engine.submit(wrong, lambda e: None)
        release = threading.Event()
        stalled = threading.Event()

        def stalling_sink(event: object) -> None:  # holds the engine loop until released
            stalled.set()
            release.wait(10)

        h.engine.submit(h.request(1, max_tokens=30), stalling_sink)
        assert stalled.wait(5)
        events: list[object] = []
        h.engine.submit(h.request(2, max_tokens=2), events.append)
        h.engine.submit(h.request(3, max_tokens=2), events.append)
        t0 = time.perf_counter()
        with pytest.raises(QueueFull, match="2 requests waiting"):
            h.engine.submit(h.request(4, max_tokens=2), events.append)
        assert time.perf_counter() - t0 < 0.5
        release.set()
        deadline = time.monotonic() + 10
        while sum(isinstance(e, Finished) for e in events) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sum(isinstance(e, Finished) for e in events) == 2
    finally:
        h.engine.shutdown(timeout=10)


def test_leased_cached_image_needs_no_pixels(checkpoint_factory) -> None:
    """The HTTP layer skips decoding an image whose tokens are cached: it leases them and sends no pixels."""
    from vlmserve.server.engine.prepare import image_hash

    h = Harness(checkpoint_factory("clip-llama"), max_running=4, enable_prefix_caching=False)
    try:
        data = _png(77)
        first = _alone(h, h.request(77, max_tokens=6))  # encodes and caches the image
        digest = image_hash(data)
        tokens = h.engine.lease_image(h.preparer.image_key(digest))
        assert tokens is not None and tokens.shape == (16, h.model.config.text.hidden_size)
        assert h.engine.lease_image(h.preparer.image_key(digest), "another-salt") is None
        req = h.request(77, max_tokens=6)
        req.images = [h.preparer.leased(digest, tokens)]
        encoded = h.engine.counters.images_encoded
        again = _alone(h, req)
        assert again.token_ids == first.token_ids and h.engine.counters.images_encoded == encoded
        assert h.engine.lease_image(h.preparer.image_key("never-seen")) is None
    finally:
        h.engine.shutdown(timeout=5)


def test_deferred_image_is_checked_where_received_and_resolved_where_cached(checkpoint_factory, monkeypatch) -> None:
    """The Ray ingress sends an image as checked bytes (DeferredImage), decoding each (salt, bytes) once; its
    replica leases the visual tokens of a repeat and prepares a miss's pixels, exactly as preparing them at once
    would. An engine handed an unresolved one fails that request alone."""
    from vlmserve.model.image_decode import ImageError
    from vlmserve.server.engine import prepare as prepare_module
    from vlmserve.server.engine.prepare import image_hash

    h = Harness(checkpoint_factory("clip-llama"), max_running=4, enable_prefix_caching=False)
    try:
        data, plan = _png(78), h.preparer.plan()
        digest = image_hash(data)
        with pytest.raises(ImageError):  # a truncated image is refused by the receiver, before any engine
            h.preparer.deferred(data[:100], image_hash(data[:100]), plan)
        deferred = h.preparer.deferred(data, digest, plan)
        assert len(deferred) == 1 and deferred[0].pixel_values is None and deferred[0].deferred is not None
        decoded: list[int] = []
        real_open = prepare_module.open_image
        monkeypatch.setattr(prepare_module, "open_image", lambda *a, **k: decoded.append(1) or real_open(*a, **k))
        assert h.preparer.deferred(data, digest, plan) == deferred and decoded == []  # a repeat: its hash only
        h.preparer.deferred(data, digest, plan, cache_salt="tenant-b")  # another salt learns nothing from timing
        assert decoded == [1]
        assert deferred[0].key == h.preparer.image_key(digest, plan)
        unresolved = h.request(78, max_tokens=4)
        unresolved.images = deferred
        failed = list(h.engine.generate(unresolved))[-1]
        assert isinstance(failed, Failed) and failed.error.code == "invalid_request"
        miss = h.preparer.resolve(deferred, lambda key: None)
        direct = h.preparer.image(data, digest, plan)
        assert miss[0].deferred is None and miss[0].key == direct[0].key
        assert torch.equal(miss[0].pixel_values, direct[0].pixel_values)
        first = _alone(h, h.request(78, max_tokens=6))  # encodes and caches the image
        hit = h.preparer.resolve(deferred, h.engine.lease_image)
        assert hit[0].pixel_values is None and hit[0].visual_tokens is not None
        req = h.request(78, max_tokens=6)
        req.images = hit
        encoded = h.engine.counters.images_encoded
        assert _alone(h, req).token_ids == first.token_ids and h.engine.counters.images_encoded == encoded
    finally:
        h.engine.shutdown(timeout=5)


def test_vision_cache_is_bounded_in_bytes() -> None:
    from vlmserve.server.engine.vision_cache import VisionCache

    cache = VisionCache(max_bytes=3 * 400)  # three (10, 10) float32 entries
    for i in range(3):
        cache.put(("m", str(i)), torch.zeros(10, 10))
    assert cache.get(("m", "0")) is not None  # now the most recently used
    cache.put(("m", "3"), torch.zeros(10, 10))  # over budget: the least recently used entry ("1") goes
    assert ("m", "0") in cache and ("m", "1") not in cache and cache.bytes <= cache.max_bytes
    cache.put(("m", "4"), torch.zeros(10, 10))
    assert len(cache) == 3 and cache.bytes == 1200
    assert cache.get(("m", "missing")) is None and cache.misses == 1


def test_compiled_decode_step_gives_the_same_tokens(checkpoint_factory) -> None:
    """`compile` (torch.compile of the decode step) changes speed, not tokens."""
    eager = Harness(checkpoint_factory("clip-llama"), max_running=4, weight_layout="input-major")  # as compiled's
    compiled = Harness(checkpoint_factory("clip-llama"), max_running=4, compile=True)
    try:
        for i in range(3):
            a = eager.request(i, max_tokens=24)
            b = compiled.request(i, max_tokens=24)
            a.ignore_eos = b.ignore_eos = True
            assert _alone(compiled, b).token_ids == _alone(eager, a).token_ids
        assert compiled.engine.alive and compiled.engine.counters.decode_forwards >= 3 * 23
    finally:
        eager.engine.shutdown(timeout=5)
        compiled.engine.shutdown(timeout=5)


def test_compiled_decode_of_several_sequences_gives_the_same_tokens(checkpoint_factory) -> None:
    """The compiled step's graphs for two and more decodes (a dynamic size) and for steps with prefill chunks (here
    small: chunks beside running decodes), against eager, batched."""
    eager = Harness(checkpoint_factory("clip-llama"), max_running=4, max_num_batched_tokens=24)
    compiled = Harness(checkpoint_factory("clip-llama"), max_running=4, max_num_batched_tokens=24, compile=True)
    try:
        runs = []
        for h in (eager, compiled):
            reqs = [h.request(i, max_tokens=8 + 4 * i) for i in range(4)]  # lengths differ: 4, 3, 2, 1 decodes
            for r in reqs:
                r.ignore_eos = True
            runs.append([f.token_ids for f in h.run_concurrently(reqs)])
        assert runs[1] == runs[0]
        assert compiled.engine.core.runner._compiled is not None  # still compiled: it did not fall back
        counters = compiled.engine.counters
        assert counters.prefill_forwards > 4 and counters.compiled_prefill_forwards == counters.prefill_forwards
        if kernels.step_ops() is not None:  # the compiled step called the C++ ops, not the Python ones
            assert compiled.engine.core.runner._native is not None
    finally:
        eager.engine.shutdown(timeout=5)
        compiled.engine.shutdown(timeout=5)


def test_compiled_vision_tower_matches_eager(checkpoint_factory) -> None:
    """With `compile`, two and more images go through the compiled tower (one graph for any number): the same
    visual tokens as eager within float32 rounding (fused layer norms round differently: ~6e-5 here)."""
    h = Harness(checkpoint_factory("clip-llama"), max_running=4, compile=True)
    try:
        runner = h.engine.core.runner
        inner, seen = runner._compiled_encode, []
        assert inner is not None
        runner._compiled_encode = lambda px: (seen.append(px.shape[0]), inner(px))[1]
        size = h.model.config.vision.image_size
        pixels = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            for n in (2, 3, 5, 1):
                torch.testing.assert_close(runner._encode_images(pixels[:n]), h.model.encode_images(pixels[:n]),
                                           rtol=1e-3, atol=1e-4)  # fused norms: float32 rounding
        assert seen == [2, 3, 5]  # one image: eager
    finally:
        h.engine.shutdown(timeout=5)


def test_a_failing_compile_falls_back_to_eager(checkpoint_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No C++ compiler (or Triton) on the host: the engine logs it and serves eagerly instead of dying."""
    import vlmserve.server.engine.core as core

    def broken_compile(fn: object, **kwargs: object) -> object:
        def compiled(*args: object) -> object:
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return compiled

    monkeypatch.setattr(core.torch, "compile", broken_compile)
    h = Harness(checkpoint_factory("clip-llama"), max_running=2, compile=True)
    eager = Harness(checkpoint_factory("clip-llama"), max_running=2)
    try:
        got = _alone(h, h.request(5, max_tokens=12))
        assert h.engine.alive and got.finish_reason in ("stop", "length")
        assert got.token_ids == _alone(eager, eager.request(5, max_tokens=12)).token_ids
    finally:
        h.engine.shutdown(timeout=5)
        eager.engine.shutdown(timeout=5)
