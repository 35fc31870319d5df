"""Image-affinity routing as a Ray Serve `RequestRouter`: one deployment keeps Ray's autoscaling and failover.

Each request names its affinity key (server/scale/affinity.py) in the handle call's `affinity_key` keyword. The
router ranks the live replicas by rendezvous hashing of that key and sends the request to the first, so that
repeats of an image meet a vision cache and a prefix cache that already hold it. When the first one's queue is
longer than the shortest by more than `imbalance_threshold` requests, the preference gives way to
power-of-two-choices (two random replicas, the shorter queue wins). Requests without a key (metrics, stats) take
power-of-two-choices too.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .affinity import affinity_order

log = logging.getLogger(__name__)
DEFAULT_IMBALANCE_THRESHOLD = 8  # ongoing requests: past this gap to the shortest queue, affinity yields


class ImageAffinityRouter(RequestRouter):
    def initialize_state(self, imbalance_threshold: int = DEFAULT_IMBALANCE_THRESHOLD, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"ImageAffinityRouter takes imbalance_threshold only, not {sorted(kwargs)}")
        self.imbalance_threshold = int(imbalance_threshold)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = pending_request.kwargs.get("affinity_key") if pending_request is not None else None
        if not isinstance(key, str) or len(candidate_replicas) == 1:
            return [_two_choices(candidate_replicas)]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = affinity_order(key, await self._queue_lengths(candidate_replicas), self.imbalance_threshold)
        if order is None:
            log.debug("the preferred replica's queue is over the imbalance threshold: two choices")
            return [_two_choices(candidate_replicas)]
        ranked = [by_id[i] for i in order]
        return [[ranked[0]], ranked[1:]]  # the later rank only if the first refuses (its queue is full)

    async def _queue_lengths(self, replicas: list[RunningReplica]) -> dict[str, int | None]:
        """Ongoing requests per replica, from Ray's cache where fresh, else probed."""
        out: dict[str, int | None] = {}
        stale: list[RunningReplica] = []
        for r in replicas:
            n = self.replica_queue_len_cache.get(r.replica_id)
            out[r.replica_id.unique_id] = n
            if n is None:
                stale.append(r)
        if stale:
            for r, n in await self._probe_queue_lens(stale, 0):
                out[r.replica_id.unique_id] = n
        return out


class RoundRobinRouter(RequestRouter):
    """Each request to the next replica in turn, whatever it carries: the baseline image affinity is measured
    against (`--replica-routing round_robin`, benchmarks/bench_scale_out.py)."""

    def initialize_state(self, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"RoundRobinRouter takes no arguments, not {sorted(kwargs)}")
        self.turn = 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        self.turn += 1
        start = self.turn % len(ordered)
        return [[ordered[start]], ordered[start + 1:] + ordered[:start]]


def _two_choices(replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Two random replicas; Ray sends the request to the one with the shorter queue."""
    return random.sample(replicas, min(2, len(replicas)))
