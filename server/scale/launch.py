"""`vlmserve serve --replicas N`: the Serve application on a local Ray (started here) or a running cluster.

SIGTERM or SIGINT drains: the application is deleted (Serve lets running requests finish, up to
`--drain-timeout`), then the Serve instance and the local Ray this command started are shut down, leaving no
process behind. Joining a cluster (`--ray-address`), only the application is deleted.
"""

from __future__ import annotations

import logging
import signal
import threading

from ..settings import Settings
from .fast_path import ensure_fast_path

log = logging.getLogger(__name__)
APP_NAME = "vlmserve"


def serve_on_ray(settings: Settings) -> int:
    local = settings.ray_address is None
    if local:  # before Ray and Serve are imported and started: their processes inherit it
        ensure_fast_path()

    import ray
    from ray import serve

    from .app import application

    stop = threading.Event()
    ray.init(address=settings.ray_address, namespace="vlmserve", include_dashboard=False,
             log_to_driver=settings.log_level == "debug")
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        log.info("deploying %d replica(s) of %s on Ray Serve", max(1, settings.replicas), settings.model_id())
        serve.run(application(settings), name=APP_NAME, route_prefix="/", blocking=False)
        log.info("serving %s on http://%s:%d (OpenAI API at /v1), %s", settings.model_id(), settings.host,
                 settings.port, "local Ray" if local else f"Ray at {settings.ray_address}")
        stop.wait()
        log.info("draining: deleting the Serve application")
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()
    finally:
        ray.shutdown()
    return 0
