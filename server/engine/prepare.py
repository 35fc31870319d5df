"""Turning a chat (messages + image bytes) into an `EngineRequest`: tokenization, image decoding and preprocessing.

This runs off the engine's loop (the server calls it in a thread pool): it is the CPU-heavy part of a request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vlmserve.model.image_decode import open_image
from vlmserve.model.images import ImageProcessor
from vlmserve.model.sampling import SamplingParams
from vlmserve.model.tokenizer import ChatTokenizer, EncodedPrompt

from .config import ImageLimits
from .requests import BadRequest, EngineRequest, ImageInput


def image_hash(data: bytes) -> str:
    """Content key of an image: the same bytes always give the same visual tokens."""
    return hashlib.blake2b(data, digest_size=20).hexdigest()


class RequestPreparer:
    """Tokenizes chats and turns image bytes into pixel tensors for one model."""

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        processor: ImageProcessor,
        num_visual_tokens: int,
        limits: ImageLimits | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.processor = processor
        self.num_visual_tokens = num_visual_tokens
        self.limits = limits or ImageLimits()
        # The processing settings that turn bytes into pixels: part of every image's key, so that cached visual
        # tokens (and KV blocks over them) are reused only for the same bytes processed the same way.
        self.processing = hashlib.blake2b(repr(processor.config).encode(), digest_size=8).hexdigest()

    def visual_tokens(self, detail: str | None = None, max_image_tokens: int | None = None) -> int:
        """The visual tokens one image becomes at OpenAI's `detail` (low / high / auto) within `max_image_tokens`;
        BadRequest naming the numbers when no setting fits. Known before any pixel work.

        The llava-1.5 family has one resolution: every `detail` gives the checkpoint's `num_visual_tokens` (the
        setting nearest to ~100 tokens for `low` is that one too)."""
        if detail not in (None, "auto", "low", "high"):
            raise BadRequest(f"detail must be low, high or auto, not {detail!r}")
        if max_image_tokens is not None and max_image_tokens < self.num_visual_tokens:
            raise BadRequest(f"this model makes every image {self.num_visual_tokens} visual tokens; "
                             f"max_image_tokens {max_image_tokens} is below that")
        return self.num_visual_tokens

    def image_key(self, digest: str) -> str:
        """The content key of an image with bytes hash `digest`, processed by this preparer."""
        return f"{digest}-{self.processing}"

    def leased(self, digest: str, visual_tokens: torch.Tensor | None) -> ImageInput | None:
        """An image the engine already holds visual tokens for (Engine.lease_image), needing no decoding."""
        if visual_tokens is None:
            return None
        return ImageInput(self.image_key(digest), None, self.num_visual_tokens, visual_tokens=visual_tokens)

    def encode(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
               image_tokens: Sequence[int] | None = None, token_limit: int | None = None) -> EncodedPrompt:
        """Token ids of the chat (with the functions it offers, `tools`), each image part expanded to its
        visual-token slots (`image_tokens`, one count per image; default `num_visual_tokens`), cheap: no image
        work. A rendered prompt surely over `token_limit` raises PromptTooLong before it is tokenized."""
        counts = self.num_visual_tokens if image_tokens is None else list(image_tokens)
        return self.tokenizer.encode_chat(messages, num_image_tokens=counts, tools=tools, token_limit=token_limit)

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

    def image(self, data: bytes, digest: str | None = None) -> ImageInput:
        """Decode (header-checked against the limits first) and preprocess one image. Raises ImageError."""
        rgb = open_image(data, max_pixels=self.limits.max_image_pixels, max_bytes=self.limits.max_image_bytes)
        pixels = self.processor.preprocess_one(rgb)  # (C, H, W)
        return ImageInput(self.image_key(digest or image_hash(data)), pixels, self.num_visual_tokens)

    def request(
        self,
        request_id: str,
        messages: Sequence[Mapping[str, Any]],
        images: Sequence[bytes] = (),
        *,
        sampling: SamplingParams | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
    ) -> EngineRequest:
        """The whole preparation in one call (for scripts, tests and benchmarks)."""
        encoded = self.encode(messages)
        return EngineRequest(
            request_id=request_id,
            prompt_ids=encoded.input_ids,
            images=[self.image(b) for b in images],
            sampling=sampling or SamplingParams(),
            max_tokens=max_tokens,
            stop=stop,
        )
