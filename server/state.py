"""What the app holds: the model and engine (loaded once, in the background), readiness and draining."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmserve.model.images import ImageProcessor
from vlmserve.model.sampling import SamplingParams
from vlmserve.model.tokenizer import ChatTokenizer
from vlmserve.model.vlm import VisionLanguageModel
from vlmserve.model.weights import load_model, resolve_checkpoint

from .engine import Engine, Event, Failed, Finished
from .engine.audio_prepare import AudioPreparer
from .engine.prepare import RequestPreparer
from .engine.serving import ServingEngine
from .errors import APIError
from .metrics import Metrics
from .settings import Settings
from .tool_parsers import parser_for_template

log = logging.getLogger(__name__)
WARM_UP_TIMEOUT_S = 900  # compiling the decode step on a slow machine takes minutes at worst


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[setting]


async def in_fresh_thread(fn: Callable[[], None], name: str) -> None:
    """Run `fn` in a thread of its own that ends with it (not in the event loop's pool, whose threads live on).

    The model loads this way because OpenMP keeps one thread team per thread that ever ran parallel torch work, for
    as long as that thread lives; with more team threads than cores, libgomp's idle workers stop spinning and every
    parallel op of the engine thread pays a futex wake-up (on 2 cores a decode step went from 13 to 19 ms). A thread
    that exits takes its team with it, leaving the engine thread's team alone."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not done.done():
            done.set_result(None) if error is None else done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            fn()
        except BaseException as e:
            error = e
        with contextlib.suppress(RuntimeError):  # the loop closed first (shutdown during loading)
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    await done


class ServerState:
    """Model, engine and preprocessing pool of one server process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.model_id = settings.model_id()
        self.engine: ServingEngine | None = None
        self.preparer: RequestPreparer | None = None
        self.audio: AudioPreparer | None = None  # a model with an audio tower
        self.tool_parser = "hermes"  # how answers' tool calls are read (settled at load)
        self.generation_defaults: dict[str, Any] = {}
        self.executor = ThreadPoolExecutor(max_workers=settings.preprocess_workers, thread_name_prefix="preprocess")
        self.ready = False
        self.draining = False
        self.load_error: BaseException | None = None
        self.created = int(time.time())
        self.on_fatal: Callable[[], None] | None = None  # set by the CLI: make the process exit non-zero
        # Ray Serve: /metrics from the ingress's own text and every replica's (server/scale/metrics_board.py)
        self.replica_metrics: Callable[[str], Awaitable[str]] | None = None

    # -- loading ---------------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load encoder + projector + LM once, start the engine and warm it up (runs in a worker thread)."""
        s = self.settings
        t0 = time.perf_counter()
        try:
            path = resolve_checkpoint(s.model)
            device = pick_device(s.device)
            dtype = pick_dtype(s.dtype, device)
            model = load_model(path, device=device, dtype=dtype)
            tokenizer = self.load_frontend(path, model)
            config = s.engine_config()
            engine = Engine(model, tokenizer, config, model_id=self.model_id, observer=self.metrics).start()
            self.engine = engine
            if config.compile:
                log.info("compiling the decode step (inductor keeps the result: later starts take seconds)")
            self._warm_up()
        except BaseException as e:
            self.load_error = e
            log.exception("loading %s failed", s.model)
            raise
        self.ready = True
        log.info("model %s ready on %s (%s) in %.1fs; context %d, %d rows", self.model_id, device, dtype,
                 time.perf_counter() - t0, engine.max_model_len, s.max_running)

    def load_frontend(self, path: Path, model: VisionLanguageModel) -> ChatTokenizer:
        """Tokenizer, tool-call parser, image preprocessing and sampling defaults: what the HTTP side needs of a
        checkpoint (`model` may live on the meta device: only its config is read)."""
        s = self.settings
        tokenizer = ChatTokenizer.from_pretrained(path, chat_template=s.chat_template_text())
        self.tool_parser = (parser_for_template(tokenizer.chat_template) if s.tool_call_parser == "auto"
                            else s.tool_call_parser)
        log.info("tool calls: %s (template renders tools: %s)", self.tool_parser, tokenizer.renders_tools)
        # A model without a vision tower (qwen2_audio) refuses image parts before any processing; its preparer
        # still holds an image processor, CLIP's defaults, that no request reaches.
        processor = (ImageProcessor.from_pretrained(path) if model.config.vision is not None
                     else ImageProcessor.for_vision_model("clip_vision_model", 224))
        if model.config.audio is not None:
            self.audio = AudioPreparer.for_checkpoint(path, model.config.audio.encoder, s.audio_limits())
        self.preparer = RequestPreparer(tokenizer, processor, model.config.num_visual_tokens, s.image_limits(),
                                        anyres=model.anyres)
        log.debug("longest token: %d bytes", tokenizer.max_token_bytes)  # computed now, not on a request
        self.generation_defaults = _generation_defaults(path)
        return tokenizer

    def _warm_up(self) -> None:
        """Two short generations with an image each (and a clip, with an audio tower), side by side: the first real
        requests pay for no lazy initialisation (with `compile`, the graphs compile here: the decode step for one
        sequence and for several, the prefill step, the vision tower for several images)."""
        assert isinstance(self.engine, Engine) and self.preparer is not None
        sees = self.engine.model.config.vision is not None
        audio = [self.audio.clip(_silence_wav(), "wav")] if self.audio is not None else []
        parts = [{"type": "image"}] * sees + [{"type": "audio"}] * len(audio)
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "warm up"}]}]
        sinks: list[queue.Queue[Event]] = []
        side_by_side = (8, 4) if self.engine.config.max_running >= 2 else (8,)  # one row: one at a time
        for i, max_tokens in enumerate(side_by_side):
            buf = io.BytesIO()  # two images, so that the vision tower's graph for several compiles here too
            Image.new("RGB", (64, 64), (128 + i, 128, 128)).save(buf, "PNG")
            images = [buf.getvalue()] if sees else []
            req = self.preparer.request(f"warmup-{i}", messages, images, sampling=SamplingParams(temperature=0),
                                        max_tokens=max_tokens, audio=audio)
            req.ignore_eos = True  # every step runs, whatever the model answers
            sinks.append(queue.Queue())
            self.engine.submit(req, sinks[-1].put)
        for sink in sinks:
            while not isinstance(event := sink.get(timeout=WARM_UP_TIMEOUT_S), Finished):
                if isinstance(event, Failed):
                    raise RuntimeError(f"warm-up generation failed: {event}")

    # -- status ----------------------------------------------------------------------------------------------------
    def require_ready(self) -> tuple[ServingEngine, RequestPreparer]:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="draining", retry_after=5)
        if self.engine is None or self.preparer is None or not self.ready:
            raise APIError(503, "the model is still loading", code="not_ready", retry_after=5)
        if not self.engine.alive:
            raise APIError(503, "the engine has stopped", code="engine_dead", retry_after=5)
        return self.engine, self.preparer

    def is_ready(self) -> bool:
        return self.ready and not self.draining and self.engine is not None and self.engine.alive

    def begin_drain(self) -> None:
        """SIGTERM: /ready turns 503, new requests get 503, running ones go on."""
        if not self.draining:
            log.info("draining: no new requests; %d running", self.engine.num_running if self.engine else 0)
        self.draining = True
        if self.engine is not None:
            self.engine.drain()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown(timeout=self.settings.drain_timeout)
        self.executor.shutdown(wait=False, cancel_futures=True)


def _silence_wav() -> bytes:
    """One second of 16 kHz silence as WAV bytes (the warm-up clip)."""
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(32000))
    return buf.getvalue()


def _generation_defaults(path: Path) -> dict[str, Any]:
    """Sampling defaults from the checkpoint; `do_sample: false` means greedy unless the request says otherwise."""
    try:
        config = json.loads((path / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, Any] = {}
    if config.get("do_sample") is False:
        out["temperature"] = 0.0
    elif config.get("do_sample"):
        for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
            if isinstance(config.get(key), int | float):
                out[key] = config[key]
    return out
