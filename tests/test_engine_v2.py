"""Engine v2: KV blocks, prefix caching keyed by image content and salt, chunked prefill, preemption, the core in a
separate process, and the metrics that report them. Each behaviour is checked against a cold run's tokens."""

from __future__ import annotations

import io
import queue
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_engine import QUESTIONS, Harness, _alone, _png

from vlmserve.model.sampling import SamplingParams
from vlmserve.server.engine import EngineConfig, EngineRequest, Finished
from vlmserve.server.engine.kv_cache_manager import KVCacheManager, block_key, root_key
from vlmserve.server.metrics import Metrics


# ---------------------------------------------------------------------------------------------- block manager
def test_blocks_allocate_free_and_count_references() -> None:
    m = KVCacheManager(4, 2)
    a = m.allocate(3)
    assert len(set(a)) == 3 and m.num_free == 1 and m.usage == 0.75
    with pytest.raises(ValueError, match="2 blocks asked for, 1 free"):
        m.allocate(2)
    m.register(a[0], b"k0")
    m.hold([a[0]])  # a second holder
    m.free(a)
    assert m.num_free == 3 and m.blocks[a[0]].ref_count == 1
    m.free([a[0]])
    assert m.num_free == 4 and m.usage == 0.0
    with pytest.raises(RuntimeError, match="freed more often"):
        m.free([a[0]])


def test_free_blocks_keep_their_keys_until_reused_least_recent_first() -> None:
    m = KVCacheManager(3, 4)
    blocks = m.allocate(3)
    for b, key in zip(blocks, (b"a", b"b", b"c"), strict=True):
        m.register(b, key)
    m.free(blocks)  # freed last block first: c, b, a in LRU order
    assert m.match([b"a", b"b", b"c"]) == blocks  # still findable while free
    fresh = m.allocate(1)  # takes the least recently freed: c's block
    assert fresh == [blocks[2]]
    assert m.match([b"a", b"b", b"c"]) == blocks[:2] and m.match([b"c"]) == []
    m.hold(blocks[:2])
    assert m.num_free == 0 and m.blocks[blocks[0]].ref_count == 1


def test_a_growing_sequence_takes_the_next_block_when_it_caches_nothing() -> None:
    m = KVCacheManager(8, 2)
    a = m.allocate(2)  # [0, 1]
    b = m.allocate(1)  # [2]: now 2 follows a's last block, but it is taken
    assert m.allocate(1, after=a[-1]) == [3]  # not the next block (held by b): LRU order
    m.free(b)
    assert m.allocate(2, after=1) == [2, 4]  # 2 is free and empty again: taken out of turn, then LRU order
    c = m.allocate(1)  # [5]
    m.register(c[0], b"cached")
    m.free(c)  # 5 is free but caches a prefix: a sequence ending at 4 does not take it out of turn
    assert m.allocate(1, after=4) == [6] and m.match([b"cached"]) == [5]


def test_a_run_of_blocks_reads_the_same_keys_as_a_gather() -> None:
    import torch

    from vlmserve.model.kv_cache import PagedKVCache

    cache = PagedKVCache(num_layers=2, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=3)
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape))
    for layer in range(2):
        got = cache.run(layer, 2, 10)  # blocks 2, 3, 4: ten keys
        want = cache.gather(layer, torch.tensor([[2, 3, 4]]), 10)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)) and got[0].shape == (1, 10, 2, 3)


def test_block_keys_chain_tokens_images_and_salt() -> None:
    root = root_key("model", "")
    k1 = block_key(root, [1, 2, 3, 4])
    assert block_key(root, [1, 2, 3, 4]) == k1
    assert block_key(root_key("model", "tenant"), [1, 2, 3, 4]) != k1  # salt
    assert block_key(root_key("other", ""), [1, 2, 3, 4]) != k1  # model
    assert block_key(k1, [5, 6]) != block_key(block_key(root, [1, 2, 3, 9]), [5, 6])  # parent chained in
    img = block_key(root, [7, 7, 7, 7], [("image-a", 0)])
    assert img != block_key(root, [7, 7, 7, 7], [("image-b", 0)])  # same placeholder ids, other image
    assert img != block_key(root, [7, 7, 7, 7], [("image-a", 4)])  # another offset inside the image
    assert img != block_key(root, [7, 7, 7, 7])


def test_prefix_caching_off_matches_nothing() -> None:
    m = KVCacheManager(2, 2, enable_prefix_caching=False)
    b = m.allocate(1)
    m.register(b[0], b"k")
    assert m.match([b"k"]) == []


# ---------------------------------------------------------------------------------------------- engine-level
def _chat(turns: list[tuple[str, str | None]], n_images: int = 1) -> list[dict]:
    """A chat about one image: the image in the first user turn, then (question, answer-or-None) pairs."""
    msgs: list[dict] = []
    for i, (q, a) in enumerate(turns):
        content = ([{"type": "image"}] * n_images if i == 0 else []) + [{"type": "text", "text": q}]
        msgs.append({"role": "user", "content": content})
        if a is not None:
            msgs.append({"role": "assistant", "content": a})
    return [{"role": "system", "content": "You answer questions about shapes. " * 2}, *msgs]


def _req(h: Harness, rid: str, messages: list[dict], images: list[bytes], *, salt: str = "",
         max_tokens: int = 8) -> EngineRequest:
    req = h.preparer.request(rid, messages, images, sampling=SamplingParams(temperature=0.0), max_tokens=max_tokens)
    req.cache_salt, req.ignore_eos = salt, True
    return req


@pytest.fixture(scope="module")
def engine(checkpoint_factory) -> Harness:
    metrics = Metrics()
    h = Harness(checkpoint_factory("clip-llama"), max_running=16, block_size=4)
    h.engine.core.observer = h.engine.core.runner.observer = h.engine.core.output.observer = metrics
    h.metrics = metrics
    yield h
    h.engine.shutdown(timeout=5)


def _metric(m: Metrics, name: str) -> float:
    return m.registry.get_sample_value(name) or 0.0


def test_second_turn_reuses_the_image_and_first_turn_and_equals_a_cold_run(engine: Harness) -> None:
    image = _png(101)
    first = _alone(engine, _req(engine, "t1", _chat([("what color is the circle?", None)]), [image]))
    turn2 = _chat([("what color is the circle?", first.text), ("how many shapes are there?", None)])
    hits_before = _metric(engine.metrics, "vlmserve:prefix_cache_hits_total")
    second = _alone(engine, _req(engine, "t2", turn2, [image]))
    cold = _alone(engine, _req(engine, "t2-cold", turn2, [image], salt="cold"))
    first_prompt = len(engine.preparer.encode(_chat([("what color is the circle?", None)])).input_ids)
    assert second.usage.cached_tokens >= first_prompt - 4  # the first turn's prompt, image included (4-token blocks)
    assert cold.usage.cached_tokens == 0  # another salt shares nothing
    assert second.token_ids == cold.token_ids
    assert _metric(engine.metrics, "vlmserve:prefix_cache_hits_total") - hits_before == second.usage.cached_tokens
    assert _metric(engine.metrics, "vlmserve:prefix_cache_queries_total") >= second.usage.prompt_tokens


def test_images_one_pixel_apart_never_share_blocks(engine: Harness) -> None:
    pixels = np.random.RandomState(5).randint(0, 255, (40, 50, 3), dtype=np.uint8)
    other = pixels.copy()
    other[7, 9, 0] ^= 1
    images = []
    for arr in (pixels, other):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        images.append(buf.getvalue())
    msgs = _chat([("describe the image", None)])
    a = _alone(engine, _req(engine, "px-a", msgs, [images[0]], max_tokens=12))
    b = _alone(engine, _req(engine, "px-b", msgs, [images[1]], max_tokens=12))
    ids = engine.preparer.encode(msgs).input_ids
    image_start = ids.index(engine.model.config.image_token_index)
    assert b.usage.cached_tokens <= image_start  # only the text before the image can be shared
    for name, got, img in (("a", a, images[0]), ("b", b, images[1])):
        cold = _alone(engine, _req(engine, f"px-{name}-cold", msgs, [img], salt=f"cold-{name}", max_tokens=12))
        assert got.token_ids == cold.token_ids


def test_different_salts_share_nothing(engine: Harness) -> None:
    msgs = _chat([("is there a red square?", None)])
    image = _png(202)
    _alone(engine, _req(engine, "s1", msgs, [image], salt="tenant-a"))
    same = _alone(engine, _req(engine, "s2", msgs, [image], salt="tenant-a"))
    other = _alone(engine, _req(engine, "s3", msgs, [image], salt="tenant-b"))
    assert same.usage.cached_tokens > 0 and other.usage.cached_tokens == 0
    assert same.token_ids == other.token_ids


def test_kv_usage_gauge_moves_and_returns_to_zero(engine: Harness) -> None:
    assert _metric(engine.metrics, "vlmserve:kv_cache_usage_perc") == 0.0  # idle: nothing held
    stream = engine.engine.generate(_req(engine, "gauge", _chat([("describe the image", None)]), [_png(3)],
                                         max_tokens=30))
    next(stream)
    assert _metric(engine.metrics, "vlmserve:kv_cache_usage_perc") > 0.0
    list(stream)
    assert engine.engine.core.blocks.usage == 0.0


def test_chunked_prefill_gives_the_same_tokens(checkpoint_factory) -> None:
    ckpt = checkpoint_factory("clip-llama")
    chunked = Harness(ckpt, max_running=8, max_num_batched_tokens=16, block_size=4, enable_prefix_caching=False)
    whole = Harness(ckpt, max_running=8, enable_prefix_caching=False)
    try:
        reqs = [(i, _chat([(QUESTIONS[i % 4], None)])) for i in range(4)]
        a = chunked.run_concurrently([_req(chunked, f"c{i}", m, [_png(i)], max_tokens=10) for i, m in reqs])
        b = whole.run_concurrently([_req(whole, f"w{i}", m, [_png(i)], max_tokens=10) for i, m in reqs])
        assert [x.token_ids for x in a] == [y.token_ids for y in b]
        assert chunked.engine.counters.steps > whole.engine.counters.steps  # the prompts (>16 tokens) were split
    finally:
        chunked.engine.shutdown(timeout=5)
        whole.engine.shutdown(timeout=5)


def test_preemption_under_a_tiny_pool_finishes_every_request_correctly(checkpoint_factory) -> None:
    ckpt = checkpoint_factory("clip-llama")
    # 512 bytes of KV per token here: 1 MB = 2048 tokens, room for one full context (256) and not much more.
    tiny = Harness(ckpt, max_running=12, kv_cache_mb=1, block_size=16, max_model_len=256)
    ref = Harness(ckpt, max_running=12)
    metrics = Metrics()
    tiny.engine.core.observer = tiny.engine.core.output.observer = tiny.engine.core.runner.observer = metrics
    try:
        reqs = [tiny.request(i, max_tokens=150) for i in range(12)]
        for r in reqs:
            r.ignore_eos = True
        got = tiny.run_concurrently(reqs)
        assert tiny.engine.core.scheduler.num_preemptions > 0
        assert _metric(metrics, "vlmserve:num_preemptions_total") == tiny.engine.core.scheduler.num_preemptions
        for i, g in enumerate(got):
            want = ref.request(i, max_tokens=150)
            want.ignore_eos = True
            assert g.finish_reason == "length" and g.token_ids == _alone(ref, want).token_ids, i
    finally:
        tiny.engine.shutdown(timeout=10)
        ref.engine.shutdown(timeout=10)


def test_sixty_four_short_requests_share_one_batch_in_a_pool_smaller_than_their_contexts(
    checkpoint_factory, tmp_path: Path
) -> None:
    from checkpoints import SPECS, build_checkpoint

    ckpt = build_checkpoint(replace(SPECS["clip-llama"], name="clip-llama-4k", max_positions=4096), tmp_path)
    # 64 x 4096 tokens x 512 bytes = 128 MB of KV if contexts were reserved; the pool has 16.
    h = Harness(ckpt, max_running=64, max_waiting=64, max_model_len=4096, kv_cache_mb=16,
                max_num_batched_tokens=4096)
    try:
        assert h.engine.core.kv.nbytes <= 16 * 2**20 < 64 * 4096 * 512
        reqs = [h.request(i, max_tokens=8) for i in range(64)]
        for r in reqs:
            r.ignore_eos = True
        # Hold the engine loop in a sink while all 64 are submitted, so that they arrive together.
        release, stalled = threading.Event(), threading.Event()

        def stall(event: object) -> None:
            stalled.set()
            release.wait(10)

        h.engine.submit(h.request(99, max_tokens=1), stall)
        assert stalled.wait(10)
        done: list[queue.Queue] = []
        for r in reqs:
            done.append(queue.Queue())
            h.engine.submit(r, done[-1].put)
        release.set()
        finals = []
        for q in done:
            while not isinstance(event := q.get(timeout=60), Finished):
                pass
            finals.append(event)
        assert all(f.usage.completion_tokens == 8 for f in finals)
        assert h.engine.counters.max_batch_size == 64
    finally:
        h.engine.shutdown(timeout=10)


def test_the_core_in_a_separate_process_gives_the_same_tokens(checkpoint_factory) -> None:
    from vlmserve.server.engine.process import EngineProcess

    ckpt = checkpoint_factory("clip-llama")
    local = Harness(ckpt, max_running=4)
    remote = EngineProcess(ckpt, EngineConfig(max_running=4, compile=False), model_id=ckpt.name)
    try:
        reqs = [local.request(i, max_tokens=12) for i in range(4)]
        events = remote.run(reqs)
        for req in reqs:
            final = events[req.request_id][-1]
            assert isinstance(final, Finished)
            assert final.token_ids == _alone(local, local.request(reqs.index(req), max_tokens=12)).token_ids
    finally:
        remote.close()
        local.engine.shutdown(timeout=5)


def test_engine_refuses_a_pool_smaller_than_one_context(checkpoint_factory) -> None:
    with pytest.raises(ValueError, match="less than one context of 256"):
        Harness(checkpoint_factory("clip-llama"), kv_cache_mb=0.1, max_model_len=256)
