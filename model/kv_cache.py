"""The paged key/value cache: one pool of fixed-size blocks per layer, addressed through per-sequence block tables.

A block holds the keys and values of `block_size` consecutive tokens of one sequence. A sequence's block table lists
its blocks in order, so the token at position `p` lives in block `table[p // block_size]` at offset
`p % block_size`. Which sequence owns which block, reference counts and prefix reuse are the engine's business
(server/engine/kv_cache_manager.py); this file only holds the memory and sizes it.

Layout: per layer one K and one V tensor, (num_blocks, block_size, num_kv_heads, head_dim). A step writes its new
tokens with one `index_copy_` over the flattened (num_blocks * block_size) token axis, and reads a sequence's keys by
gathering its blocks, or, for a sequence whose blocks lie in one run (the block manager prefers that), as a view.
"""

from __future__ import annotations

import torch


def bytes_per_block(*, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    """Memory of one block across all layers, keys and values."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class PagedKVCache:
    """Keys and values of `num_layers` layers in `num_blocks` blocks of `block_size` tokens."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs at least one block of one token ({num_blocks} x {block_size})")
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # L x (NB, BS, Hkv, Dh)
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # L x (NB, BS, Hkv, Dh)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        # Views made once, not per layer and step: the flat token axis (writes, runs) and whole blocks (gathers)
        self._k_tokens = [t.view(-1, num_kv_heads, head_dim) for t in self.k]  # L x (NB * BS, Hkv, Dh)
        self._v_tokens = [t.view(-1, num_kv_heads, head_dim) for t in self.v]  # L x (NB * BS, Hkv, Dh)
        self._k_blocks = [t.view(num_blocks, -1) for t in self.k]  # L x (NB, BS * Hkv * Dh)
        self._v_blocks = [t.view(num_blocks, -1) for t in self.v]  # L x (NB, BS * Hkv * Dh)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the keys/values (N, Hkv, Dh) of N tokens at flat token slots (N,) = block * block_size + offset."""
        self._k_tokens[layer].index_copy_(0, slots, k)
        self._v_tokens[layer].index_copy_(0, slots, v)

    def gather(self, layer: int, tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, length, Hkv, Dh) of the sequences whose block tables are `tables` (B, n_blocks)."""
        b = tables.shape[0]
        flat = tables.reshape(-1)  # (B * n_blocks,)
        # index_select over whole blocks (rows of block_size * Hkv * Dh): one memcpy per block, 2-7x faster on a CPU
        # than advanced indexing's element-wise kernel (0.16 vs 1.0 ms for 16 decodes x 233 keys, keys and values)
        k = self._k_blocks[layer].index_select(0, flat)  # (B * n_blocks, BS * Hkv * Dh)
        v = self._v_blocks[layer].index_select(0, flat)  # (B * n_blocks, BS * Hkv * Dh)
        shape = (b, -1, self.num_kv_heads, self.head_dim)
        return k.view(shape)[:, :length], v.view(shape)[:, :length]  # (B, length, Hkv, Dh) each

    def run(self, layer: int, first_block: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (1, length, Hkv, Dh) of one sequence whose blocks are consecutive from `first_block`:
        views of the pool, read in place (no gather)."""
        start = first_block * self.block_size
        return self._k_tokens[layer][None, start : start + length], self._v_tokens[layer][None, start : start + length]
