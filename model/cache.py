"""A preallocated key/value cache, written by index.

The cache holds `num_slots` sequences of up to `max_len` tokens for every layer. A sequence owns one slot for its
whole life; its keys and values at position `p` live at `[slot, p]`. Writes go by (slot, position) index, so
sequences of different lengths share one batched forward: each token's position says where its keys land, and the
attention mask (key position <= query position) hides whatever an earlier occupant of the slot left beyond the
current length. Nothing is ever cleared: freeing a slot is just forgetting it.

Layout: one tensor per layer and per K/V, (num_slots, max_len, num_kv_heads, head_dim), so that a write of (B, T)
tokens is one index_put on a whole tensor (in place, also under torch.compile, which would copy a whole base tensor
to update a view of it) and a read of the first `kv_len` positions of contiguous slots is a view.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values for `num_layers` layers, `num_slots` sequences, `max_len` positions each."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_slots, max_len, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # L x (S, T_max, H_kv, D)
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # L x (S, T_max, H_kv, D)
        self.num_slots = num_slots
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def update(
        self,
        layer: int,
        k: torch.Tensor,  # (B, T, H_kv, D)
        v: torch.Tensor,  # (B, T, H_kv, D)
        positions: torch.Tensor,  # (B, T)
        slots: torch.Tensor | None,  # (B,) or None for slots 0..B-1
        kv_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values, then return each sequence's first `kv_len` cached positions."""
        batch = k.shape[0]
        k_cache, v_cache = self.k[layer], self.v[layer]  # (S, T_max, H_kv, D) each
        if slots is None:
            rows = torch.arange(batch, device=k.device)[:, None].expand_as(positions)  # (B, T)
            k_cache.index_put_((rows, positions), k)
            v_cache.index_put_((rows, positions), v)
            return k_cache[:batch, :kv_len], v_cache[:batch, :kv_len]  # (B, kv_len, H_kv, D) views
        rows = slots[:, None].expand_as(positions)  # (B, T)
        k_cache.index_put_((rows, positions), k)
        v_cache.index_put_((rows, positions), v)
        return k_cache[slots, :kv_len], v_cache[slots, :kv_len]  # (B, kv_len, H_kv, D) gathered
