"""The affinity key of a request and rendezvous hashing over replicas: plain functions, no Ray."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ..engine.requests import EngineRequest

TEXT_PREFIX_TOKENS = 256  # a text-only request is keyed by this many leading prompt tokens


def affinity_key(req: EngineRequest) -> str:
    """What a request's cached state is a function of: its first image's content key (the key of the engine's
    vision cache and of every prefix-cache block over the image), else its first prompt tokens; with its
    cache salt, since caches are shared only between equal salts."""
    if req.images:
        return f"i:{req.cache_salt}\x00{req.images[0].key}"
    head = ",".join(map(str, req.prompt_ids[:TEXT_PREFIX_TOKENS]))
    return "t:" + hashlib.sha256(f"{req.cache_salt}\x00{head}".encode()).hexdigest()


def _score(key: str, node: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{node}\x00{key}".encode(), digest_size=8).digest(), "big")


def affinity_order(key: str, queue_lengths: dict[str, int | None], threshold: int) -> list[str] | None:
    """The replicas (by id) in the order `key` prefers them, or None when the preferred one has more than
    `threshold` requests more in flight than the least busy one (unknown lengths count as short): then the caller
    balances by load instead."""
    ranked = rendezvous_order(key, list(queue_lengths))
    known = [n for n in queue_lengths.values() if n is not None]
    first = queue_lengths[ranked[0]] if ranked else None
    if first is not None and known and first - min(known) > threshold:
        return None
    return ranked


def rendezvous_order(key: str, nodes: Sequence[str]) -> list[str]:
    """`nodes` by highest random weight for `key`, best first: each key prefers one node, and removing a node moves
    only the keys that preferred it."""
    return sorted(nodes, key=lambda node: _score(key, node), reverse=True)
