"""Vectorized per-request sampling: greedy, temperature, top-k, top-p, penalties, reproducible seeds.

Every row of a batch carries its own parameters as tensors, so one call samples the whole batch. Randomness is
counter-based: the noise for (seed, step, token id) is a hash of those three numbers, so a seeded request draws
the same tokens whatever else shares its batch, on any device, with no generator state to carry and no host sync.
Sampling is Gumbel-max over the filtered logits, which draws exactly from softmax(logits / temperature).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings. temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # transformers' (divide positive logits, multiply negative ones)
    presence_penalty: float = 0.0  # OpenAI's, over generated tokens
    frequency_penalty: float = 0.0  # OpenAI's, over generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, bias added to its logit), after penalties

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if any(token < 0 or not -100 <= bias <= 100 for token, bias in self.logit_bias):
            raise ValueError("logit_bias: token ids must be >= 0 and biases in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_filter(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise (B, V), a pure function of each row's (seed, step) and the token id."""
    seeds32 = (seeds ^ (seeds >> 32)) & _M32  # (B,)
    key = _mix32(seeds32 ^ _mix32((steps & _M32) + 0x9E3779B9))  # (B,)
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)  # (V,)
    bits = _mix32(key[:, None] ^ _mix32(ids[None, :] + 0x632BE5AB))  # (B, V)
    return ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)  # (B, V) in (0, 1)


def apply_penalties(
    logits: torch.Tensor,  # (B, V) float32
    counts: torch.Tensor,  # (B, V) how often each token was generated so far
    seen: torch.Tensor,  # (B, V) bool, token present in prompt or output (for the repetition penalty)
    repetition: torch.Tensor,  # (B,)
    presence: torch.Tensor,  # (B,)
    frequency: torch.Tensor,  # (B,)
) -> torch.Tensor:
    rep = repetition[:, None]  # (B, 1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)  # (B, V)
    logits = torch.where(seen, penalized, logits)
    counts = counts.to(logits.dtype)
    return logits - presence[:, None] * (counts > 0).to(logits.dtype) - frequency[:, None] * counts


def sample(
    logits: torch.Tensor,  # (B, V)
    *,
    temperature: torch.Tensor,  # (B,) 0 = greedy
    top_k: torch.Tensor,  # (B,) int64, 0 = off
    top_p: torch.Tensor,  # (B,)
    seeds: torch.Tensor,  # (B,) int64
    steps: torch.Tensor,  # (B,) int64, the index of the token being drawn
    filter_needed: bool = True,
) -> torch.Tensor:
    """Next token ids (B,). `filter_needed=False` (a host-side fact) skips the sort when no row uses top-k/top-p."""
    logits = logits.float()
    greedy_ids = logits.argmax(dim=-1)  # (B,)
    vocab = logits.shape[-1]
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))[:, None]  # (B, 1)
    scaled = logits / temp  # (B, V)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, vocab)))  # (B, V)
    if filter_needed:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)  # (B, V) each
        ranks = torch.arange(vocab, device=logits.device)[None, :]  # (1, V)
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))[:, None]  # (B, 1)
        probs = sorted_logits.softmax(dim=-1)  # (B, V)
        before = probs.cumsum(dim=-1) - probs  # (B, V) probability mass ranked above each token
        keep = (ranks < k) & ((before < top_p[:, None]) | (ranks == 0))  # (B, V)
        masked = sorted_logits.masked_fill(~keep, float("-inf")) + gumbel.gather(1, order)  # (B, V)
        sampled = order.gather(1, masked.argmax(dim=-1, keepdim=True)).squeeze(1)  # (B,)
    else:
        sampled = (scaled + gumbel).argmax(dim=-1)  # (B,)
    return torch.where(temperature > 0, sampled, greedy_ids)
