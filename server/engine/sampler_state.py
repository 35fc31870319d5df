"""Per-slot sampling parameters and penalty state on the device, so a whole batch samples in one call."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from vlmserve.model.sampling import SamplingParams, apply_penalties, sample


class SamplerState:
    """Each KV slot's sampling settings as device tensors, indexed by slot at every step."""

    def __init__(self, num_slots: int, vocab: int, device: torch.device) -> None:
        self.vocab, self.device = vocab, device
        self.temperature = torch.ones(num_slots, device=device)
        self.top_k = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.top_p = torch.ones(num_slots, device=device)
        self.seeds = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.repetition = torch.ones(num_slots, device=device)
        self.presence = torch.zeros(num_slots, device=device)
        self.frequency = torch.zeros(num_slots, device=device)
        # (S, V) token counts and seen-flags, allocated the first time a request asks for a penalty.
        self.counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self._rng = random.Random()

    def assign(self, slot: int, params: SamplingParams, prompt_ids: Sequence[int]) -> int:
        """Load a request's settings into `slot`; return the seed it samples with (drawn if it gave none)."""
        seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        self.temperature[slot] = params.temperature
        self.top_k[slot] = params.top_k
        self.top_p[slot] = params.top_p
        self.seeds[slot] = seed
        self.repetition[slot] = params.repetition_penalty
        self.presence[slot] = params.presence_penalty
        self.frequency[slot] = params.frequency_penalty
        if params.has_penalties:
            if self.counts is None or self.seen is None:
                n = self.temperature.shape[0]
                self.counts = torch.zeros(n, self.vocab, dtype=torch.int32, device=self.device)  # (S, V)
                self.seen = torch.zeros(n, self.vocab, dtype=torch.bool, device=self.device)  # (S, V)
            self.counts[slot].zero_()
            self.seen[slot].zero_()
            ids = torch.tensor([i for i in prompt_ids if 0 <= i < self.vocab], dtype=torch.long)
            self.seen[slot, ids.to(self.device)] = True
        return seed

    def sample(
        self,
        logits: torch.Tensor,  # (B, V)
        slots: torch.Tensor,  # (B,)
        steps: Sequence[int],
        params: Sequence[SamplingParams],
    ) -> list[int]:
        """Next token per row. Reading the ids back is the step's one host-device synchronisation."""
        penalized = any(p.has_penalties for p in params)
        if not penalized and all(p.greedy for p in params):
            return logits.argmax(dim=-1).tolist()
        logits = logits.float()
        if penalized and self.counts is not None and self.seen is not None:
            logits = apply_penalties(
                logits, self.counts[slots], self.seen[slots], self.repetition[slots], self.presence[slots],
                self.frequency[slots],
            )
        step_t = torch.tensor(list(steps), dtype=torch.long).to(self.device, non_blocking=True)  # (B,)
        ids = sample(
            logits,
            temperature=self.temperature[slots],
            top_k=self.top_k[slots],
            top_p=self.top_p[slots],
            seeds=self.seeds[slots],
            steps=step_t,
            filter_needed=any(p.needs_filter for p in params),
        )  # (B,)
        if penalized and self.counts is not None and self.seen is not None:
            self.counts.index_put_((slots, ids), torch.ones_like(ids, dtype=torch.int32), accumulate=True)
            self.seen[slots, ids] = True
        return ids.tolist()
