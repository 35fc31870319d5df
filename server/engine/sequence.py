"""One request inside the engine: its tokens, how many are in the KV cache, its blocks, and its output state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from vlmserve.model.detokenizer import IncrementalDetokenizer
from vlmserve.model.mrope import GridSpan

from .kv_cache_manager import BlockKey, block_key
from .requests import EngineRequest, TokenLogprob
from .stops import StopMatcher

if TYPE_CHECKING:
    from llguidance import LLMatcher


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's visual tokens sit in the prompt: positions [start, start + length)."""

    index: int  # the image's place in the request
    start: int
    length: int
    key: str  # the image's content key (ImageInput.key)

    @property
    def end(self) -> int:
        return self.start + self.length


def image_spans(req: EngineRequest, image_token_id: int, audio_token_id: int | None = None) -> list[ImageSpan]:
    """The spans of the request's images and audio clips, in prompt order, from its placeholder positions (an
    image's at `image_token_id`, a clip's at `audio_token_id`); ValueError if they disagree."""
    ids = {image_token_id} if audio_token_id is None else {image_token_id, audio_token_id}
    positions = [i for i, t in enumerate(req.prompt_ids) if t in ids]
    need = sum(img.num_tokens for img in req.images)
    if len(positions) != need:
        raise ValueError(f"the prompt has {len(positions)} image-token slots but {len(req.images)} images need {need}")
    spans, k = [], 0
    for i, img in enumerate(req.images):
        start = positions[k]
        if positions[k + img.num_tokens - 1] != start + img.num_tokens - 1:
            raise ValueError(f"image {i}'s {img.num_tokens} slots are not contiguous in the prompt")
        if req.prompt_ids[start] != (audio_token_id if img.is_audio else image_token_id):
            raise ValueError(f"{'audio clip' if img.is_audio else 'image'} {i} stands at the other kind's slots")
        spans.append(ImageSpan(i, start, img.num_tokens, img.key))
        k += img.num_tokens
    return spans


class Status(enum.Enum):
    WAITING = "waiting"  # new, or preempted (then it keeps its sampler row and its generated tokens)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    req: EngineRequest
    arrival: float
    max_tokens: int
    spans: list[ImageSpan]
    root: BlockKey  # parent key of the first block: model id and cache salt
    block_size: int
    token_ids: list[int] = field(default_factory=list)
    rope_spans: list[GridSpan] | None = None  # M-RoPE models: each image's merged grid (the runner fills it)
    prompt_len: int = 0
    status: Status = Status.WAITING
    num_computed: int = 0  # leading tokens whose keys/values are in the cache
    num_cached: int = -1  # prompt tokens the prefix cache supplied at first admission (-1: not admitted yet)
    block_table: list[int] = field(default_factory=list)
    keys: list[BlockKey] = field(default_factory=list)  # keys of the leading full blocks, as far as computed
    registered: int = 0  # leading blocks of block_table registered with the cache manager
    row: int = -1  # sampler row, held from first admission to the end (preemption keeps it)
    seed: int = 0
    visual: dict[int, torch.Tensor] = field(default_factory=dict)  # image index -> (length, D), while needed
    detok: IncrementalDetokenizer | None = None
    stops: StopMatcher | None = None
    text: list[str] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # tokens accepted since the last TextDelta
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when the request asks: one per reported token
    reported: int = 0  # logprobs already sent in a TextDelta
    matcher: LLMatcher | None = None  # llguidance's matcher of req.grammar, following the generated tokens
    first_token_at: float = 0.0
    last_token_at: float = 0.0

    def __post_init__(self) -> None:
        self.token_ids = list(self.req.prompt_ids)
        self.prompt_len = len(self.token_ids)

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def generated(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def remaining(self) -> int:
        """Tokens to run through the model before the next one can be sampled."""
        return len(self.token_ids) - self.num_computed

    def key_of(self, block: int) -> BlockKey:
        """The content key of full block `block` (computed once, in chain order)."""
        bs = self.block_size
        while len(self.keys) <= block:
            b = len(self.keys)
            lo, hi = b * bs, (b + 1) * bs
            if hi > len(self.token_ids):
                raise ValueError(f"block {b} is not full")
            images = [(s.key, lo - s.start) for s in self.spans if s.start < hi and s.end > lo]
            parent = self.keys[-1] if self.keys else self.root
            self.keys.append(block_key(parent, self.token_ids[lo:hi], images))
        return self.keys[block]

    def spans_in(self, lo: int, hi: int) -> list[ImageSpan]:
        """The image spans that overlap positions [lo, hi)."""
        return [s for s in self.spans if s.start < hi and s.end > lo]
