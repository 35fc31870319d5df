"""The HTTP ingress on Ray Serve: the same FastAPI app as one process, its engine the replicas behind a handle.

The ingress loads what the HTTP side needs of the checkpoint (tokenizer, chat template, image preprocessing, the
model's shape on the meta device: no weights) and a `RemoteEngine`. `/ready` turns 200 once every replica the
deployment asked for has loaded and warmed up; `/metrics` adds every replica's metrics, labelled by rank.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from vlmserve.model.config import VLMConfig
from vlmserve.model.vlm import VisionLanguageModel
from vlmserve.model.weights import resolve_checkpoint

from ..api import create_app
from ..settings import Settings
from ..state import ServerState
from .metrics_board import merged
from .remote_engine import RemoteEngine, wait_for_replicas

log = logging.getLogger(__name__)
ENGINE_DEPLOYMENT = "EngineReplica"
REPLICA_START_TIMEOUT_S = 900


@serve.ingress()
class Ingress:
    """Deployed by server/scale/app.py with the engine replicas' handle and the metrics board's."""

    def __init__(self, settings: dict[str, Any], engine: DeploymentHandle[Any], board: DeploymentHandle[Any]) -> None:
        self.settings = Settings(**settings)
        self.engine, self.board = engine, board

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.settings, load=self._load)

    async def _load(self, state: ServerState) -> None:
        try:
            path = resolve_checkpoint(self.settings.model)
            config = VLMConfig.from_file(path / "config.json")
            with torch.device("meta"):
                model = VisionLanguageModel(config)  # sizes only: the weights live in the replicas
            tokenizer = await asyncio.to_thread(state.load_frontend, path, model)
            info = await wait_for_replicas(self.engine, REPLICA_START_TIMEOUT_S)
            state.engine = RemoteEngine(self.engine, model, tokenizer, self.settings.engine_config(), info)
            state.replica_metrics = self._replica_metrics
            await self._all_replicas_running()
        except BaseException as e:
            state.load_error = e
            log.exception("the ingress failed to start")
            raise
        state.ready = True
        log.info("ingress ready: %s on Ray Serve", state.model_id)

    async def _all_replicas_running(self) -> None:
        """Until the engine deployment has every replica it targets running (loaded and warmed up)."""
        app = serve.get_replica_context().app_name
        while True:
            status = await asyncio.to_thread(serve.status)
            deployment = status.applications[app].deployments[ENGINE_DEPLOYMENT]
            if deployment.status == "HEALTHY":
                return
            await asyncio.sleep(0.5)

    async def _replica_metrics(self, ingress: str) -> str:
        texts: dict[int, str] = await self.board.collect.remote()
        return merged(ingress, texts)
