"""What the HTTP layer needs of an engine: `Engine` (one process) and the Ray Serve client (server/scale/) both are.

The routes only admit, submit, cancel and ask a few sizes; whether the model sits in this process or behind a
distributed runtime is the engine's business. Events reach a request's sink from any thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from vlmserve.model.vlm import VisionLanguageModel

    from .config import EngineConfig
    from .requests import EngineRequest, EventSink


class ServingEngine(Protocol):
    model: VisionLanguageModel  # for sizes only (parameter counts, dtype); a remote engine's lives on `meta`
    config: EngineConfig
    max_model_len: int
    error: BaseException | None

    @property
    def alive(self) -> bool: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def num_running(self) -> int: ...

    @property
    def kv_cache_bytes(self) -> int: ...

    def drain(self) -> None: ...

    def shutdown(self, *, timeout: float = 30.0) -> None: ...

    def check_admission(self) -> None: ...

    def reserve(self) -> None: ...

    def unreserve(self) -> None: ...

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None) -> int: ...

    def compile_grammar(self, grammar: str) -> None: ...

    def submit(self, req: EngineRequest, sink: EventSink) -> None: ...

    def lease_image(self, key: str, cache_salt: str = "") -> torch.Tensor | None: ...

    @property
    def defers_images(self) -> bool:
        """Whether images go to this engine as checked bytes (`DeferredImage`), prepared where it runs."""
        ...

    def cancel(self, request_id: str) -> None: ...

    async def replica_rank(self, request_id: str) -> int | None:
        """The rank of the replica serving `request_id`, once it is known (None: none took it)."""
        ...
