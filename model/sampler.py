"""Per-row sampling parameters and penalty state on the device, so a whole batch samples in one call."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from .sampling import SamplingParams, apply_penalties, sample


class SamplerState:
    """Each row's sampling settings as device tensors, indexed by row at every step.

    A row belongs to one running request (the engine hands them out; `generate` uses one); its penalty counts follow
    the tokens it samples, so they survive the request's preemption and recompute.
    """

    def __init__(self, num_rows: int, vocab: int, device: torch.device | str) -> None:
        self.vocab, self.device = vocab, device
        self.temperature = torch.ones(num_rows, device=device)
        self.top_k = torch.zeros(num_rows, dtype=torch.long, device=device)
        self.top_p = torch.ones(num_rows, device=device)
        self.seeds = torch.zeros(num_rows, dtype=torch.long, device=device)
        self.repetition = torch.ones(num_rows, device=device)
        self.presence = torch.zeros(num_rows, device=device)
        self.frequency = torch.zeros(num_rows, device=device)
        # (R, V) token counts and seen-flags, allocated the first time a request asks for a penalty.
        self.counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self._rng = random.Random()

    def assign(self, row: int, params: SamplingParams, prompt_ids: Sequence[int]) -> int:
        """Load a request's settings into `row`; return the seed it samples with (drawn if it gave none)."""
        seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p
        self.seeds[row] = seed
        self.repetition[row] = params.repetition_penalty
        self.presence[row] = params.presence_penalty
        self.frequency[row] = params.frequency_penalty
        if params.has_penalties:
            if self.counts is None or self.seen is None:
                n = self.temperature.shape[0]
                self.counts = torch.zeros(n, self.vocab, dtype=torch.int32, device=self.device)  # (R, V)
                self.seen = torch.zeros(n, self.vocab, dtype=torch.bool, device=self.device)  # (R, V)
            self.counts[row].zero_()
            self.seen[row].zero_()
            ids = torch.tensor([i for i in prompt_ids if 0 <= i < self.vocab], dtype=torch.long)
            self.seen[row, ids.to(self.device)] = True
        return seed

    def sample(
        self,
        logits: torch.Tensor,  # (B, V)
        rows: torch.Tensor,  # (B,)
        steps: Sequence[int],
        params: Sequence[SamplingParams],
    ) -> list[int]:
        """Next token per row. Reading the ids back is the step's one host-device synchronisation."""
        penalized = any(p.has_penalties for p in params)
        biased = any(p.logit_bias for p in params)
        if not penalized and not biased and all(p.greedy for p in params):
            return logits.argmax(dim=-1).tolist()
        logits = logits.float()
        if penalized and self.counts is not None and self.seen is not None:
            logits = apply_penalties(
                logits, self.counts[rows], self.seen[rows], self.repetition[rows], self.presence[rows],
                self.frequency[rows],
            )
        if biased:
            logits = self._bias(logits, params)
        if all(p.greedy for p in params) and not penalized:
            return logits.argmax(dim=-1).tolist()
        step_t = torch.tensor(list(steps), dtype=torch.long).to(self.device, non_blocking=True)  # (B,)
        ids = sample(
            logits,
            temperature=self.temperature[rows],
            top_k=self.top_k[rows],
            top_p=self.top_p[rows],
            seeds=self.seeds[rows],
            steps=step_t,
            filter_needed=any(p.needs_filter for p in params),
        )  # (B,)
        if penalized and self.counts is not None and self.seen is not None:
            self.counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.int32), accumulate=True)
            self.seen[rows, ids] = True
        return ids.tolist()

    def _bias(self, logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """Add each row's logit_bias to its logits (B, V): one scatter for the whole batch."""
        at = [(i, token, bias) for i, p in enumerate(params) for token, bias in p.logit_bias if token < self.vocab]
        rows = torch.tensor([a[0] for a in at], dtype=torch.long).to(self.device, non_blocking=True)
        tokens = torch.tensor([a[1] for a in at], dtype=torch.long).to(self.device, non_blocking=True)
        values = torch.tensor([a[2] for a in at], dtype=logits.dtype).to(self.device, non_blocking=True)
        return logits.index_put((rows, tokens), values, accumulate=True)  # (B, V)


def token_logprobs(
    logits: torch.Tensor,  # (B, V) the raw logits the tokens were sampled from
    tokens: Sequence[int],
    ks: Sequence[int | None],
) -> dict[int, tuple[float, list[tuple[int, float]]]]:
    """For each row i whose ks[i] is not None: the log-probability of tokens[i] under softmax(logits[i]), and the
    ks[i] likeliest (token id, logprob), best first. One batched log-softmax and top-k for all of them."""
    rows = [i for i, k in enumerate(ks) if k is not None]
    lp = torch.log_softmax(logits[rows].float(), dim=-1)  # (S, V)
    picked = torch.tensor([tokens[i] for i in rows], dtype=torch.long, device=lp.device)  # (S,)
    chosen = lp.gather(1, picked[:, None])[:, 0].tolist()  # (S,)
    k_max = min(max(ks[i] or 0 for i in rows), lp.shape[-1])
    values, ids = lp.topk(k_max, dim=-1) if k_max else (lp[:, :0], picked[:, None][:, :0])  # (S, k) each
    top_v: list[list[float]] = values.tolist()
    top_i: list[list[int]] = ids.tolist()
    return {i: (chosen[j], list(zip(top_i[j][: ks[i]], top_v[j][: ks[i]], strict=True))) for j, i in enumerate(rows)}
