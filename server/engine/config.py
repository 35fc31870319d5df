"""The engine's two configurations, free of torch, pydantic and HTTP.

`server/settings.py` takes the defaults of its serving settings from these classes and builds them by field name
(`Settings.engine_config()`, `Settings.image_limits()`): a field here that shares its name with a setting is set
from it; a field without one (`max_model_len_cap`, `max_images_per_encode`) keeps its default. This module imports
no torch, so that `vlmserve --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlmserve.model.serving_weights import Layout

CPU_KV_CACHE_MB = 1024  # the KV pool on a CPU when --kv-cache-mb is not given
CUDA_KV_CACHE_SHARE = 0.8  # on CUDA: this share of the memory free once the model is loaded


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 64  # most sequences in one step (sampler rows; no memory reserved per sequence)
    max_waiting: int = 64  # admitted requests waiting beyond the free rows; past it, QueueFull (429)
    max_model_len: int | None = None  # context per sequence; None: the model's max_position_embeddings, capped
    max_model_len_cap: int = 4096  # cap on the default above
    max_tokens_default: int = 1024  # when a request omits max_tokens: the rest of the context, at most this
    max_num_batched_tokens: int = 2048  # tokens in one step: decodes plus prefill chunks
    kv_cache_mb: float | None = None  # the KV block pool; None: CPU_KV_CACHE_MB, or a share of free CUDA memory
    block_size: int = 16  # tokens per KV block
    enable_prefix_caching: bool = True
    max_images_per_encode: int = 32  # images per vision encoder call
    vision_cache_mb: float = 256  # the visual-token cache (vision_cache.py)
    compile: bool = True  # torch.compile the decode-only steps (model/step_attention.py); eager if that fails
    weight_layout: Layout = "auto"  # how the weights are laid out for serving (model/serving_weights.py)


@dataclass(frozen=True)
class ImageLimits:
    """What `RequestPreparer` checks of each image (the number of images is the routes' business)."""

    max_image_bytes: int = 20 * 1024**2  # one image's encoded bytes
    max_image_pixels: int = 40_000_000  # one image's pixels, read from its header before decoding
