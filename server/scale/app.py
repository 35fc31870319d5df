"""The Serve application: the ingress, the engine replicas, the metrics board; `build_app` is `serve run`'s entry.

    serve run vlmserve.server.scale.app:build_app model=/path/to/checkpoint replicas=2
    serve run deploy/ray/serve.yaml

Arguments are `Settings` fields (as in `vlmserve serve --help`); `VLMSERVE_*` variables fill the rest.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from ..settings import Settings
from .ingress import ENGINE_DEPLOYMENT, Ingress
from .metrics_board import MetricsBoard
from .replica import EngineReplica
from .router import ImageAffinityRouter, RoundRobinRouter

QUIET = {"enable_access_log": False}  # as one process (uvicorn's access log off): no log line per request


def build_app(args: dict[str, Any]) -> Application:
    """`serve run`'s application builder: `args` are settings (YAML `args:` or `key=value` on the command line)."""
    settings = Settings(**args)
    if settings.replicas < 1 and not settings.autoscaling():
        settings = settings.model_copy(update={"replicas": 1})
    return application(settings)


def engine_options(settings: Settings) -> dict[str, Any]:
    """The engine deployment's Serve options, from the settings."""
    s = settings
    router = ImageAffinityRouter if s.replica_routing == "affinity" else RoundRobinRouter
    options: dict[str, Any] = {
        "name": ENGINE_DEPLOYMENT,
        "logging_config": QUIET,
        "ray_actor_options": {"num_cpus": s.replica_cpus, "num_gpus": s.replica_gpus},
        "max_ongoing_requests": s.max_running + s.max_waiting,  # past it Ray queues; the engine answers 429 first
        "health_check_period_s": s.health_check_period_s,
        "health_check_timeout_s": max(10.0, 3 * s.health_check_period_s),
        "graceful_shutdown_timeout_s": s.drain_timeout,
        "request_router_config": {
            "request_router_class": f"{router.__module__}.{router.__name__}",
            "request_router_kwargs": {"imbalance_threshold": s.affinity_imbalance} if router is ImageAffinityRouter
            else {},
        },
    }
    if s.autoscaling():
        assert s.max_replicas is not None
        floor = s.min_replicas if s.min_replicas is not None else 1
        options["autoscaling_config"] = {
            "min_replicas": floor,
            "initial_replicas": max(floor, min(s.replicas, s.max_replicas)) if s.replicas else floor,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s,
            # Ray's defaults (30 s over metrics every 10 s), shorter with short delays (tests)
            "look_back_period_s": (look_back := min(30.0, max(2.0, 2 * s.upscale_delay_s))),
            "metrics_interval_s": min(10.0, look_back / 2),
        }
    else:
        options["num_replicas"] = s.replicas
    return options


def application(settings: Settings) -> Application:
    given = settings.model_dump()
    board = serve.deployment(name="MetricsBoard", num_replicas=1, ray_actor_options={"num_cpus": 0},
                             logging_config=QUIET)(MetricsBoard)
    engine = serve.deployment(**engine_options(settings))(EngineReplica)
    ingress = serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": settings.ingress_cpus},
                               max_ongoing_requests=10_000, graceful_shutdown_timeout_s=settings.drain_timeout,
                               logging_config=QUIET)(Ingress)
    metrics = board.bind()
    return ingress.bind(given, engine.bind(given, metrics), metrics)
