"""What scale-out decides without Ray: a request's affinity key, rendezvous hashing over replicas, the merged
per-replica metrics, the replica header of one process, and the scale-out settings' checks."""

from __future__ import annotations

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from vlmserve.server.engine.requests import EngineRequest, ImageInput
from vlmserve.server.metrics import Metrics
from vlmserve.server.scale.affinity import TEXT_PREFIX_TOKENS, affinity_key, affinity_order, rendezvous_order
from vlmserve.server.scale.metrics_board import merged
from vlmserve.server.settings import Settings


def image(key: str) -> ImageInput:
    return ImageInput(key, torch.zeros(3, 4, 4), num_tokens=4)


def test_affinity_key_is_the_first_images_cache_key_with_the_salt() -> None:
    a = EngineRequest("a", [1, 2, 3], [image("img-1"), image("img-2")])
    b = EngineRequest("b", [9, 9], [image("img-1")])
    assert affinity_key(a) == affinity_key(b)  # the prompt and later images do not matter
    assert affinity_key(a) != affinity_key(EngineRequest("c", [1, 2, 3], [image("img-2")]))
    assert affinity_key(a) != affinity_key(EngineRequest("d", [1, 2, 3], [image("img-1")], cache_salt="tenant"))


def test_text_only_requests_are_keyed_by_their_first_prompt_tokens() -> None:
    head = list(range(TEXT_PREFIX_TOKENS))
    assert affinity_key(EngineRequest("a", [*head, 1])) == affinity_key(EngineRequest("b", [*head, 2, 3]))
    assert affinity_key(EngineRequest("a", [5, *head])) != affinity_key(EngineRequest("b", head))


def test_rendezvous_spreads_keys_and_moves_only_a_removed_nodes_keys() -> None:
    nodes = [f"replica-{i}" for i in range(4)]
    keys = [f"key-{i}" for i in range(400)]
    first = {k: rendezvous_order(k, nodes)[0] for k in keys}
    counts = {n: sum(1 for v in first.values() if v == n) for n in nodes}
    assert all(60 < c < 140 for c in counts.values()), counts
    survivors = nodes[1:]
    after = {k: rendezvous_order(k, survivors)[0] for k in keys}
    moved = {k for k in keys if after[k] != first[k]}
    assert moved == {k for k in keys if first[k] == "replica-0"}
    assert sorted(rendezvous_order("x", nodes)) == sorted(nodes)


def test_affinity_yields_to_load_past_the_threshold() -> None:
    ids = ["a", "b", "c"]
    key = next(f"k{i}" for i in range(100) if rendezvous_order(f"k{i}", ids)[0] == "a")
    assert affinity_order(key, {"a": 9, "b": 1, "c": None}, threshold=8) == rendezvous_order(key, ids)  # 8: not over
    assert affinity_order(key, {"a": 10, "b": 1, "c": None}, threshold=8) is None
    assert affinity_order(key, {"a": None, "b": 0, "c": 0}, threshold=0) == rendezvous_order(key, ids)  # unknown
    assert affinity_order(key, {"a": 3, "b": 20, "c": 30}, threshold=0) == rendezvous_order(key, ids)  # shortest


def test_merged_metrics_label_every_replica_and_keep_the_ingresss_own() -> None:
    ingress, r0, r1 = Metrics(), Metrics(), Metrics()
    ingress.http.labels("/v1/chat/completions", "200").inc()
    r0.generation_tokens.inc(5)
    r1.generation_tokens.inc(7)
    r1.queue_state(running=2, waiting=3)
    text = merged(_text(ingress), {0: _text(r0), 1: _text(r1)})
    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses: one TYPE line per family
    tokens = {s.labels["replica"]: s.value for s in families["vlmserve:generation_tokens"].samples
              if s.name.endswith("_total")}
    assert tokens == {"0": 5.0, "1": 7.0}
    waiting = {s.labels["replica"]: s.value for s in families["vlmserve:num_requests_waiting"].samples}
    assert waiting == {"0": 0.0, "1": 3.0}
    http = [s for s in families["vlmserve:http_requests"].samples if s.name.endswith("_total")]
    assert [(s.labels.get("replica"), s.value) for s in http] == [(None, 1.0)]
    assert text.count("# TYPE vlmserve:num_requests_waiting ") == 1


def _text(m: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(m.registry).decode()


def test_one_process_answers_from_replica_zero(live_server) -> None:
    body = {"model": live_server.model_id, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(live_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["x-vlmserve-replica"] == "0"
    with httpx.stream("POST", live_server.url + "/v1/chat/completions", json={**body, "stream": True}) as s:
        assert s.headers["x-vlmserve-replica"] == "0"
    assert "x-vlmserve-replica" not in httpx.get(live_server.url + "/v1/models").headers


def test_scale_out_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="min_replicas needs max_replicas"):
        Settings(min_replicas=1)
    with pytest.raises(ValidationError, match="over max_replicas"):
        Settings(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError):
        Settings(replica_cpus=0)
    assert Settings(max_replicas=2).autoscaling() and not Settings(replicas=2).autoscaling()
