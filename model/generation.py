"""Generation as a few small functions (gpt-fast style): build the prompt's embeddings, prefill, decode one step,
and a plain single-request `generate` that yields tokens as they come. The engine batches the same primitives.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .cache import KVCache
from .sampling import SamplingParams, apply_penalties, sample
from .vlm import VisionLanguageModel


def prompt_embeddings(
    model: VisionLanguageModel,
    input_ids: Sequence[int] | torch.Tensor,  # (T,)
    visual_tokens: torch.Tensor | None = None,  # (N_img, N_vis, D) in prompt order
) -> torch.Tensor:
    """Embeddings (T', D) of one prompt with its images: at the placeholders if it has them, else prepended."""
    device = model.language_model.embed_tokens.weight.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)[None]  # (1, T)
    embeds = model.embed_tokens(ids)  # (1, T, D)
    if visual_tokens is None or visual_tokens.numel() == 0:
        return embeds[0]
    if (ids == model.config.image_token_index).any():
        return model.merge_at_placeholders(ids, embeds, visual_tokens)[0]
    flat = visual_tokens.reshape(1, -1, visual_tokens.shape[-1]).to(embeds.dtype)  # (1, N_img * N_vis, D)
    return torch.cat([flat, embeds], dim=1)[0]  # (N_img * N_vis + T, D)


def prefill(
    model: VisionLanguageModel,
    embeds: torch.Tensor,  # (B, T, D) right-padded
    lengths: torch.Tensor,  # (B,) real lengths
    cache: KVCache,
    slots: torch.Tensor | None,  # (B,)
    start: torch.Tensor | None = None,  # (B,) position of the first token (0 for a fresh sequence)
) -> torch.Tensor:
    """Run the prompts through the LM, filling the cache; return each prompt's last-token logits (B, V)."""
    b, t, _ = embeds.shape
    offsets = torch.zeros(b, dtype=torch.long, device=embeds.device) if start is None else start
    positions = offsets[:, None] + torch.arange(t, device=embeds.device)[None, :]  # (B, T)
    kv_len = t if start is None else None
    hidden = model.language_model(
        inputs_embeds=embeds, positions=positions, cache=cache, slots=slots, kv_len=kv_len, logits=False
    )  # (B, T, D)
    last = hidden[torch.arange(b, device=embeds.device), lengths - 1]  # (B, D)
    return model.language_model.lm_head(last)  # (B, V)


def decode_step(
    model: VisionLanguageModel,
    tokens: torch.Tensor,  # (B,)
    positions: torch.Tensor,  # (B,)
    cache: KVCache,
    slots: torch.Tensor | None,  # (B,)
    kv_len: int,
    equal_lengths: bool = False,
) -> torch.Tensor:
    """One token per sequence through the LM; return next-token logits (B, V).

    `equal_lengths`: every position is kv_len - 1 (the caller knows it on the host), so no attention mask is needed.
    """
    logits = model.language_model(
        tokens[:, None], positions=positions[:, None], cache=cache, slots=slots, kv_len=kv_len, unmasked=equal_lengths
    )  # (B, 1, V)
    return logits[:, 0]


@torch.inference_mode()
def generate(
    model: VisionLanguageModel,
    input_ids: Sequence[int],
    *,
    pixel_values: torch.Tensor | None = None,  # (N_img, C, H, W)
    max_new_tokens: int = 32,
    sampling: SamplingParams | None = None,
    eos_token_ids: Sequence[int] = (),
    suppress_token_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yield the generated token ids of one request, stopping after an EOS id (which is yielded) or the budget.

    `suppress_token_ids` are never sampled (their logits are set to -inf).
    """
    params = sampling or SamplingParams(temperature=0.0)
    device = model.language_model.embed_tokens.weight.device
    visual = model.encode_images(pixel_values.to(device)) if pixel_values is not None else None
    embeds = prompt_embeddings(model, input_ids, visual)  # (T, D)
    prompt_len = embeds.shape[0]
    text = model.config.text
    max_len = min(prompt_len + max_new_tokens, model.language_model.rotary.max_positions)
    if prompt_len >= max_len:
        raise ValueError(f"prompt of {prompt_len} tokens leaves no room in a context of {max_len}")
    cache = KVCache(
        num_layers=text.num_hidden_layers, num_slots=1, max_len=max_len, num_kv_heads=text.num_key_value_heads,
        head_dim=text.head_dim, dtype=embeds.dtype, device=device,
    )
    eos = set(eos_token_ids)
    vocab = model.language_model.lm_head.out_features
    row = _SamplingRow(params, vocab, device, prompt_ids=input_ids)
    suppress = torch.as_tensor(list(suppress_token_ids), dtype=torch.long, device=device)
    logits = prefill(model, embeds[None], torch.tensor([prompt_len], device=device), cache, None)  # (1, V)
    for step in range(max_len - prompt_len):
        if suppress.numel():
            logits = logits.index_fill(-1, suppress, float("-inf"))
        token = int(row.sample(logits, step))
        yield token
        if token in eos:
            return
        pos = prompt_len + step
        if pos + 1 >= max_len:
            return
        row.observe(token)
        tokens = torch.tensor([token], device=device)
        positions = torch.tensor([pos], device=device)
        logits = decode_step(model, tokens, positions, cache, None, kv_len=pos + 1, equal_lengths=True)


class _SamplingRow:
    """Sampling state of one request, as a batch of one (the engine keeps the batched version)."""

    def __init__(self, params: SamplingParams, vocab: int, device: torch.device, prompt_ids: Sequence[int]) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.device = device
        self.counts = torch.zeros(1, vocab, dtype=torch.int32, device=device) if params.has_penalties else None
        self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device) if params.has_penalties else None
        if self.seen is not None:
            ids = torch.as_tensor([i for i in prompt_ids if 0 <= i < vocab], dtype=torch.long, device=device)
            self.seen[0, ids] = True

    def observe(self, token: int) -> None:
        if self.counts is not None and self.seen is not None:
            self.counts[0, token] += 1
            self.seen[0, token] = True

    def sample(self, logits: torch.Tensor, step: int) -> torch.Tensor:  # (1, V)
        p, dev = self.params, self.device
        logits = logits.float()
        if self.counts is not None and self.seen is not None:
            logits = apply_penalties(
                logits, self.counts, self.seen, torch.tensor([p.repetition_penalty], device=dev),
                torch.tensor([p.presence_penalty], device=dev), torch.tensor([p.frequency_penalty], device=dev),
            )
        return sample(
            logits,
            temperature=torch.tensor([p.temperature], device=dev),
            top_k=torch.tensor([p.top_k], device=dev),
            top_p=torch.tensor([p.top_p], device=dev),
            seeds=torch.tensor([self.seed], device=dev),
            steps=torch.tensor([step], device=dev),
            filter_needed=p.needs_filter,
        )[0]
