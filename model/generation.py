"""Generation of one request, gpt-fast style: the prompt's embeddings, then a plain loop that yields tokens as they
come. The engine (server/engine) batches the same primitives: the paged cache and the batched sampler.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .attention import PagedBatch, Segment
from .kv_cache import PagedKVCache
from .sampler import SamplerState
from .sampling import SamplingParams
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


def single_sequence_batch(
    cache: PagedKVCache, start: int, num_tokens: int, device: torch.device, windows: set[int | None]
) -> tuple[PagedBatch, torch.Tensor]:
    """The paged batch of one sequence that owns the whole cache in block order: `num_tokens` new tokens after
    `start` cached ones; and their positions (1, T)."""
    end = start + num_tokens
    positions = torch.arange(start, end, device=device)  # (T,)
    table = torch.arange(cache.num_blocks, device=device)  # (n_blocks,): block i holds positions i*BS ...
    if num_tokens == 1:
        lens = torch.tensor([end], device=device)  # (1,)
        batch = PagedBatch(cache, positions, num_decodes=1, decode_tables=table[None], decode_lens=lens,
                           decode_max_len=end, decode_masks=PagedBatch.decode_masks_for(lens, end, windows, equal=True))
    else:
        batch = PagedBatch(cache, positions, segments=[Segment(0, num_tokens, end, table)])
    return batch, positions[None]


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
    block_size: int = 16,
) -> Iterator[int]:
    """Yield the generated token ids of one request, stopping after an EOS id (which is yielded) or the budget.

    The plain single-request loop over the serving primitives (paged cache, batched sampler); the engine batches
    the same. `suppress_token_ids` are never sampled (their logits are set to -inf).
    """
    params = sampling or SamplingParams(temperature=0.0)
    lm = model.language_model
    device = lm.embed_tokens.weight.device
    visual = model.encode_images(pixel_values.to(device)) if pixel_values is not None else None
    embeds = prompt_embeddings(model, input_ids, visual)  # (T, D)
    prompt_len = embeds.shape[0]
    text = model.config.text
    max_len = min(prompt_len + max_new_tokens, lm.rotary.max_positions)
    if prompt_len >= max_len:
        raise ValueError(f"prompt of {prompt_len} tokens leaves no room in a context of {max_len}")
    cache = PagedKVCache(
        num_layers=text.num_hidden_layers, num_blocks=-(-max_len // block_size), block_size=block_size,
        num_kv_heads=text.num_key_value_heads, head_dim=text.head_dim, dtype=embeds.dtype, device=device,
    )
    eos = set(eos_token_ids)
    sampler = SamplerState(1, lm.lm_head.out_features, device)
    sampler.assign(0, params, input_ids)
    row = torch.zeros(1, dtype=torch.long, device=device)
    suppress = torch.as_tensor(list(suppress_token_ids), dtype=torch.long, device=device)
    windows = lm.attention_windows()
    batch, positions = single_sequence_batch(cache, 0, prompt_len, device, windows)
    hidden = lm(inputs_embeds=embeds[None], positions=positions, paged=batch, logits=False)  # (1, T, D)
    logits = lm.lm_head(hidden[:, -1])  # (1, V)
    for step in range(max_len - prompt_len):
        if suppress.numel():
            logits = logits.index_fill(-1, suppress, float("-inf"))
        token = sampler.sample(logits, row, [step], [params])[0]
        yield token
        if token in eos:
            return
        pos = prompt_len + step
        if pos + 1 >= max_len:
            return
        batch, positions = single_sequence_batch(cache, pos, 1, device, windows)
        ids = torch.tensor([[token]], device=device)  # (1, 1)
        logits = lm(ids, positions=positions, paged=batch)[:, 0]  # (1, V)
