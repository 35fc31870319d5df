"""Turning a chat (messages + image bytes) into an `EngineRequest`: tokenization, image decoding and preprocessing.

This runs off the engine's loop (the server calls it in a thread pool): it is the CPU-heavy part of a request.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from vlmserve.model.anyres import Anyres
from vlmserve.model.image_decode import image_size, open_image
from vlmserve.model.images import ImageProcessor
from vlmserve.model.prompt import EncodedPrompt
from vlmserve.model.qwen2_vision import smart_resize
from vlmserve.model.sampling import SamplingParams
from vlmserve.model.tokenizer import ChatTokenizer

from .audio_prepare import in_prompt_order
from .config import ImageLimits
from .image_plan import LOW_TOKENS, ImagePlan
from .plan_idefics3 import Idefics3Planner
from .requests import BadRequest, DeferredImage, EngineRequest, ImageInput

__all__ = ["LOW_TOKENS", "ImagePlan", "RequestPreparer", "image_hash"]


def image_hash(data: bytes) -> str:
    """Content key of an image: the same bytes always give the same visual tokens."""
    return hashlib.blake2b(data, digest_size=20).hexdigest()


CHECKED_DIGESTS_KEPT = 4096  # (salt, digest) keys of images the Ray ingress decoded: ~1 MB


class RecentDigests:
    """The last `capacity` keys added, least recently seen dropped first; safe across the pool's threads."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def seen(self, key: str) -> bool:
        with self._lock:
            if key not in self._keys:
                return False
            self._keys.move_to_end(key)
            return True

    def add(self, key: str) -> None:
        with self._lock:
            self._keys[key] = None
            self._keys.move_to_end(key)
            while len(self._keys) > self.capacity:
                self._keys.popitem(last=False)


class RequestPreparer:
    """Tokenizes chats and turns image bytes into pixel tensors for one model."""

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        processor: ImageProcessor,
        num_visual_tokens: int,
        limits: ImageLimits | None = None,
        *,
        anyres: Anyres | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.processor = processor
        self.num_visual_tokens = num_visual_tokens  # per image (llava); per tile (llava_next): a floor per image
        self.limits = limits or ImageLimits()
        self.anyres = anyres
        self.idefics3 = (Idefics3Planner(tokenizer, processor.config, num_visual_tokens)
                         if processor.config.kind == "idefics3" else None)
        # The processing settings that turn bytes into pixels: part of every image's key, so that cached visual
        # tokens (and KV blocks over them) are reused only for the same bytes processed the same way.
        self.processing = hashlib.blake2b(repr((processor.config, anyres)).encode(), digest_size=8).hexdigest()
        self._checked = RecentDigests(CHECKED_DIGESTS_KEPT)  # images `deferred` decoded (the Ray ingress)

    @property
    def needs_size(self) -> bool:
        """Whether an image's token count depends on its size (read from its header before planning)."""
        return self.anyres is not None or self.processor.config.kind in ("qwen2_vl", "idefics3", "gemma3")

    def size(self, data: bytes) -> tuple[int, int]:
        """(height, width) of an image as it will be decoded, from its header (the limits checked). ImageError."""
        return image_size(data, max_pixels=self.limits.max_image_pixels, max_bytes=self.limits.max_image_bytes)

    def plan(self, detail: str | None = None, max_image_tokens: int | None = None,
             size: tuple[int, int] | None = None, n_images: int = 1) -> ImagePlan:
        """The visual tokens one image becomes at OpenAI's `detail` (low / high / auto) within `max_image_tokens`;
        BadRequest naming the numbers when no setting fits. Known before any pixel work (`size`, from the header,
        where the count depends on it).

        llava-1.5 has one resolution: every `detail` gives the checkpoint's `num_visual_tokens`. llava_next: `auto`
        and `high` tile the image over the checkpoint's grid pinpoints (its processor's default, and its most);
        `low` is the whole image as one tile (S x S tokens and a newline), the fewest it has, and `max_image_tokens`
        below the grid's count falls back to it. llava_onevision: the same, its one tile padded to a square, and
        every image of a request with several (`n_images`) is one tile, as its processor and model do. idefics3: its
        planner's (server/engine/plan_idefics3.py). gemma3: `_plan_views`."""
        if detail not in (None, "auto", "low", "high"):
            raise BadRequest(f"detail must be low, high or auto, not {detail!r}")
        if not self.needs_size:
            if max_image_tokens is not None and max_image_tokens < self.num_visual_tokens:
                raise BadRequest(f"this model makes every image {self.num_visual_tokens} visual tokens; "
                                 f"max_image_tokens {max_image_tokens} is below that")
            return ImagePlan(self.num_visual_tokens)
        if size is None:
            raise ValueError("a tiled model plans an image from its size")
        if self.processor.config.kind == "qwen2_vl":
            return self._plan_resized(detail, max_image_tokens, size)
        if self.idefics3 is not None:  # server/engine/plan_idefics3.py
            return self.idefics3.plan(detail, max_image_tokens, size)
        if self.processor.config.kind == "gemma3":
            return self._plan_views(detail, max_image_tokens, size)
        assert self.anyres is not None
        base = self.anyres.layout(*size, base_only=True)
        grid = self.anyres.layout(*size)
        several = n_images > 1 and self.anyres.pad_square_base  # OneVision: multi-image prompts tile nothing
        options = [base] if detail == "low" or several else [grid, base]
        for layout in options:
            tokens = self.anyres.num_tokens(layout)
            if max_image_tokens is None or tokens <= max_image_tokens:
                return ImagePlan(tokens, layout)
        fewest = self.anyres.num_tokens(base)
        raise BadRequest(f"this {size[1]}x{size[0]} image makes at least {fewest} visual tokens (the whole image as "
                         f"one tile); max_image_tokens {max_image_tokens} is below that")

    def _plan_resized(self, detail: str | None, max_image_tokens: int | None, size: tuple[int, int]) -> ImagePlan:
        """qwen2_vl: the image at its own resolution within a pixel budget. `auto` / `high`: the processor's
        max_pixels (its default is its most); `low`: at most ~100 visual tokens (LOW_TOKENS, unless min_pixels
        needs more); `max_image_tokens` lowers the budget to that many tokens."""
        cfg = self.processor.config
        factor = cfg.patch_size * cfg.merge_size
        budget = cfg.max_pixels
        if detail == "low":
            budget = min(budget, max(cfg.min_pixels, LOW_TOKENS * factor * factor))
        if max_image_tokens is not None:
            budget = min(budget, max_image_tokens * factor * factor)
        try:
            h, w = smart_resize(*size, factor, cfg.min_pixels, budget)
        except ValueError as e:
            raise BadRequest(str(e)) from e
        tokens = h * w // (factor * factor)
        if max_image_tokens is not None and tokens > max_image_tokens:
            raise BadRequest(f"this {size[1]}x{size[0]} image makes at least {tokens} visual tokens (the processor's "
                             f"min_pixels {cfg.min_pixels}); max_image_tokens {max_image_tokens} is below that")
        return ImagePlan(tokens, resized=(h, w), grid=(1, h // cfg.patch_size, w // cfg.patch_size))

    def _plan_views(self, detail: str | None, max_image_tokens: int | None, size: tuple[int, int]) -> ImagePlan:
        """gemma3: the whole image as one view of `num_visual_tokens` (256 for the released checkpoints), and with
        pan and scan each of its crops as a view of its own (model/pan_and_scan.py). `low`: pan and scan off, one
        view (the fewest the family has); `high`: on, up to the checkpoint's pan_and_scan_max_num_crops
        (Gemma3Processor's settings where it leaves them null); `auto`: the checkpoint's own do_pan_and_scan.
        `max_image_tokens` lowers the most crops one at a time, then turns pan and scan off."""
        cfg, n = self.processor.config, self.num_visual_tokens
        if detail == "high" or (detail != "low" and cfg.do_pan_and_scan):
            most = cfg.pan_and_scan.max_crops
            for k in range(most, min(most, 2) - 1, -1):  # transformers' pan_and_scan_max_num_crops=k
                try:
                    crops = replace(cfg.pan_and_scan, max_crops=k).boxes(*size)
                except ValueError as e:
                    raise BadRequest(str(e)) from e
                if max_image_tokens is None or n * (1 + len(crops)) <= max_image_tokens:
                    return ImagePlan(n * (1 + len(crops)), crops=crops)
        if max_image_tokens is not None and max_image_tokens < n:
            raise BadRequest(f"this model makes every image at least {n} visual tokens (one view, pan and scan "
                             f"off); max_image_tokens {max_image_tokens} is below that")
        return ImagePlan(n)

    def image_key(self, digest: str, plan: ImagePlan | None = None, view: int = 0) -> str:
        """The content key of view `view` of an image with bytes hash `digest`, processed by this preparer as `plan`
        says (a crop's key names its box: the whole image's tokens are the same with pan and scan or without)."""
        setting = plan.setting if plan is not None else ""
        if plan is not None and view:
            setting = "crop" + "x".join(map(str, plan.crops[view - 1]))
        return f"{digest}-{self.processing}{'-' + setting if setting else ''}"

    def leased(self, digest: str, visual_tokens: torch.Tensor | None, plan: ImagePlan | None = None, view: int = 0
               ) -> ImageInput | None:
        """View `view` of an image the engine already holds visual tokens for (Engine.lease_image), needing no
        decoding."""
        if visual_tokens is None:
            return None
        tokens = plan.tokens // plan.views if plan is not None else self.num_visual_tokens
        return ImageInput(self.image_key(digest, plan, view), None, tokens, visual_tokens=visual_tokens,
                          grid=plan.grid if plan is not None else None)  # positions need the grid still

    def encode(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
               image_tokens: Sequence[int | Sequence[int]] | None = None, token_limit: int | None = None,
               audio_tokens: Sequence[int] = ()) -> EncodedPrompt:
        """Token ids of the chat (with the functions it offers, `tools`), each image part expanded to its
        visual-token slots (`image_tokens`, one entry per image, `ImagePlan.slots`: its count, or its views' counts;
        default `num_visual_tokens`), cheap: no image work. A rendered prompt surely over `token_limit` raises
        PromptTooLong before it is tokenized."""
        counts = self.num_visual_tokens if image_tokens is None else list(image_tokens)
        return self.tokenizer.encode_chat(messages, num_image_tokens=counts, tools=tools, token_limit=token_limit,
                                          num_audio_tokens=audio_tokens)

    def token_floor(self, messages: Sequence[Mapping[str, Any]]) -> int:
        """A lower bound on the chat's prompt tokens, without tokenizing: its text's bytes over the longest
        token's, plus its images' slots. A chat over the context by this count is refused before any tokenizing (a
        20 MB prompt in microseconds, not after a minute of tokenizing)."""
        text_bytes, images = 0, 0
        for m in messages:
            content = m.get("content") or ""
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part.get("type") == "image":
                    images += 1
                else:
                    text_bytes += len(str(part.get("text") or "").encode("utf-8", errors="replace"))
        return text_bytes // self.tokenizer.max_token_bytes + images * self.num_visual_tokens

    def deferred(self, data: bytes, digest: str, plan: ImagePlan, cache_salt: str = "") -> list[ImageInput]:
        """One image as checked bytes for an engine that prepares images where it runs (`DeferredImage`): decoded
        here against the limits (so a bad image is refused where it arrived), no preprocessing. Bytes that decoded
        here lately under the same `cache_salt` are not decoded again (the same bytes, the same limits: the same
        outcome), so a repeat costs its hash only; salted as the caches are, so that the time saved tells no tenant
        what another sent. Raises ImageError."""
        checked = f"{cache_salt}\0{digest}"
        if not self._checked.seen(checked):
            open_image(data, max_pixels=self.limits.max_image_pixels, max_bytes=self.limits.max_image_bytes)
            self._checked.add(checked)
        return [ImageInput(self.image_key(digest, plan, v), None, plan.tokens // plan.views, grid=plan.grid,
                           deferred=DeferredImage(data, digest, plan, v)) for v in range(plan.views)]

    def resolve(self, inputs: Sequence[ImageInput], lease: Callable[[str], torch.Tensor | None]) -> list[ImageInput]:
        """Deferred inputs made whole: the cached visual tokens where `lease` (by image key) has them, else the
        image prepared now (once for all its views). Others unchanged. Raises ImageError."""
        out: list[ImageInput] = []
        prepared: dict[str, list[ImageInput]] = {}  # by the image's key (its first view's): its views
        for img in inputs:
            d = img.deferred
            if d is None:
                out.append(img)
            elif (tokens := lease(img.key)) is not None:
                leased = self.leased(d.digest, tokens, d.plan, d.view)
                assert leased is not None
                out.append(leased)
            else:
                whole = self.image_key(d.digest, d.plan)
                if whole not in prepared:
                    prepared[whole] = self.image(d.data, d.digest, d.plan)
                out.append(prepared[whole][d.view])
        return out

    def image(self, data: bytes, digest: str | None = None, plan: ImagePlan | None = None) -> list[ImageInput]:
        """Decode (header-checked against the limits first) and preprocess one image, as `plan` says (default: the
        checkpoint's own setting): one input per view, in prompt order (the image, then its pan-and-scan crops; else
        the image alone). Raises ImageError."""
        rgb = open_image(data, max_pixels=self.limits.max_image_pixels, max_bytes=self.limits.max_image_bytes)
        if plan is None:
            plan = self.plan(size=(rgb.height, rgb.width) if self.needs_size else None)
        digest = digest or image_hash(data)
        key = self.image_key(digest, plan)
        if plan.crops:
            views = self.processor.preprocess_views(rgb, plan.crops)  # each (C, H, W)
            return [ImageInput(self.image_key(digest, plan, v), pixels, plan.tokens // plan.views)
                    for v, pixels in enumerate(views)]
        if plan.resized is not None:
            patches = self.processor.preprocess_patches(rgb, plan.resized)  # (N, C * T * P * P)
            return [ImageInput(key, patches, plan.tokens, grid=plan.grid)]
        if plan.split is not None:
            tiles = self.processor.preprocess_split(rgb, plan.split)  # (T, C, H, W)
            return [ImageInput(key, tiles, plan.tokens, token_layout=plan.token_layout)]
        if plan.layout is None:
            return [ImageInput(key, self.processor.preprocess_one(rgb), plan.tokens)]  # (C, H, W)
        assert self.anyres is not None
        tiles = self.processor.preprocess_tiled(rgb, plan.layout, self.anyres.tile)  # (T, C, H, W)
        return [ImageInput(key, tiles, plan.tokens, layout=plan.layout)]

    def request(
        self,
        request_id: str,
        messages: Sequence[Mapping[str, Any]],
        images: Sequence[bytes] = (),
        *,
        sampling: SamplingParams | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
        audio: Sequence[ImageInput] = (),
    ) -> EngineRequest:
        """The whole preparation in one call (for scripts, tests and benchmarks); images at their default setting,
        `audio` already prepared (server/engine/audio_prepare.py `AudioPreparer.clip`)."""
        plans = [self.plan(size=self.size(b) if self.needs_size else None, n_images=len(images)) for b in images]
        encoded = self.encode(messages, image_tokens=[p.slots for p in plans],
                              audio_tokens=[a.num_tokens for a in audio])
        prepared = [view for b, p in zip(images, plans, strict=True) for view in self.image(b, None, p)]
        return EngineRequest(
            request_id=request_id,
            prompt_ids=encoded.input_ids,
            images=in_prompt_order(encoded, prepared, audio),
            sampling=sampling or SamplingParams(),
            max_tokens=max_tokens,
            stop=stop,
        )
