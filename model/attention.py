"""How a layer's queries meet its keys: a dense mask (training, oracle tests) or a paged batch (serving).

The decoder layer computes q, k and v and rotates them; what happens next is the context's business, through one
method, `attend(layer, q, k, v, window, scale)`:

- `DenseAttention`: a (B, T) batch whose keys are its own tokens, under a causal mask (optionally padded, windowed
  or given whole, as training's packed rows do). No cache.
- `PagedBatch`: one serving step. Its N tokens, from many sequences, lie side by side on one flat axis (B = 1), so
  that every projection is one matmul over all of them. The new keys/values are written into the paged cache, then
  each sequence's queries attend to its cached keys: the single-token queries (decodes) together in one batched
  call, each multi-token chunk (prefill, possibly after a cached prefix) on its own. Image spans may be made
  bidirectional (a query inside the span sees the whole span) and layers may slide a window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .kernels import paged_decode_op
from .kv_cache import PagedKVCache


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *, causal: bool,
          scale: float | None) -> torch.Tensor:
    """SDPA over (B, H, T, Dh) queries and (B, Hkv, S, Dh) keys/values; grouped-query heads shared."""
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                          enable_gqa=gqa)  # (B, H, T, Dh)


def causal_mask(
    positions: torch.Tensor,  # (B, T) query positions
    key_positions: torch.Tensor,  # (B, S)
    key_valid: torch.Tensor | None = None,  # (B, S) bool
    window: int | None = None,
) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: a query sees keys at or before its own position (and inside the window)."""
    mask = key_positions[:, None, :] <= positions[:, :, None]  # (B, T, S)
    if window is not None:
        mask &= key_positions[:, None, :] > positions[:, :, None] - window
    if key_valid is not None:
        mask &= key_valid[:, None, :]
        if mask.shape[1] == mask.shape[2]:
            # A padding query sees at least itself, so no row is fully masked (which would give NaN that later
            # layers' values would carry); real queries already see themselves.
            mask |= torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
    return mask[:, None]  # (B, 1, T, S)


class DenseAttention:
    """Attention within a (B, T) batch: causal by positions, with padding, or under an explicit mask."""

    def __init__(
        self,
        positions: torch.Tensor | None = None,  # (B, T)
        valid: torch.Tensor | None = None,  # (B, T) bool, False for padding
        mask: torch.Tensor | None = None,  # (B, 1, T, T) bool, True = attend; overrides the rest
    ) -> None:
        self.positions, self.valid, self.mask = positions, valid, mask
        self._masks: dict[int | None, torch.Tensor | None] = {}

    def _mask(self, window: int | None, t: int) -> torch.Tensor | None:
        if self.mask is not None:
            return self.mask
        if self.positions is None and self.valid is None and window is None:
            return None  # plain causal
        if window not in self._masks:
            pos = self.positions
            if pos is None:
                b = self.valid.shape[0] if self.valid is not None else 1
                pos = torch.arange(t, device=self.valid.device if self.valid is not None else None)[None].expand(b, t)
            self._masks[window] = causal_mask(pos, pos, self.valid, window)
        return self._masks[window]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
               scale: float | None = None) -> torch.Tensor:
        """q (B, T, H, Dh), k/v (B, T, Hkv, Dh) -> (B, T, H, Dh)."""
        mask = self._mask(window, q.shape[1])
        out = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, causal=True, scale=scale)
        return out.transpose(1, 2)  # (B, T, H, Dh)


@dataclass
class Segment:
    """One sequence's chunk of several tokens in a step (a prefill, or a recompute after preemption)."""

    start: int  # index of its first token on the step's flat token axis
    num_tokens: int
    context_len: int  # its keys once this step is written: tokens cached before + num_tokens
    table: torch.Tensor  # (n_blocks,) int64 block ids covering context_len
    spans: tuple[tuple[int, int], ...] = ()  # bidirectional position ranges [lo, hi) (image spans, where asked)

    @property
    def fresh(self) -> bool:
        """No cached prefix: its keys are exactly its own tokens."""
        return self.context_len == self.num_tokens


@dataclass
class PagedBatch:
    """The attention metadata of one serving step: N tokens on one flat axis, decodes first, then segments."""

    cache: PagedKVCache
    slots: torch.Tensor  # (N,) int64 flat cache slot of every token: block * block_size + offset
    num_decodes: int = 0  # the first num_decodes tokens are one query each, of distinct sequences
    decode_tables: torch.Tensor | None = None  # (B_d, n_blocks) int64, padded with any valid block id
    decode_lens: torch.Tensor | None = None  # (B_d,) int64 keys per decode, its own token included
    decode_max_len: int = 0  # max of decode_lens, known on the host
    decode_run: int | None = None  # one decode whose blocks are consecutive: its first block (keys read in place)
    decode_masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)  # window -> (B, 1, 1, S)
    segments: list[Segment] = field(default_factory=list)

    @staticmethod
    def decode_masks_for(
        lens: torch.Tensor, max_len: int, windows: set[int | None], *, equal: bool
    ) -> dict[int | None, torch.Tensor | None]:
        """Per window, the (B, 1, 1, S) mask of the keys each decode sees: below its length and inside the window;
        None where every decode sees all `max_len` keys (`equal`: all lengths are max_len, known on the host, and no
        window in reach)."""
        out: dict[int | None, torch.Tensor | None] = {}
        for window in windows:
            if equal and (window is None or max_len <= window):
                out[window] = None
                continue
            keys = torch.arange(max_len, device=lens.device)[None]  # (1, S)
            mask = keys < lens[:, None]  # (B, S)
            if window is not None:
                mask &= keys >= lens[:, None] - window
            out[window] = mask[:, None, None]  # (B, 1, 1, S)
        return out

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
               scale: float | None = None) -> torch.Tensor:
        """q (1, N, H, Dh), k/v (1, N, Hkv, Dh) -> (1, N, H, Dh), after writing k/v into the cache."""
        q, k, v = q[0], k[0], v[0]  # (N, H, Dh), (N, Hkv, Dh)
        self.cache.write(layer, self.slots, k, v)
        if not self.segments:  # a decode-only step: no output buffer to assemble
            return self._decodes(layer, q, window, scale)[None]  # (1, N, H, Dh)
        out = torch.empty_like(q)  # (N, H, Dh)
        nd = self.num_decodes
        if nd:
            out[:nd] = self._decodes(layer, q[:nd], window, scale)
        for seg in self.segments:
            s, e = seg.start, seg.start + seg.num_tokens
            out[s:e] = self._segment(layer, seg, q[s:e], k[s:e], v[s:e], window, scale)
        return out[None]  # (1, N, H, Dh)

    def _decodes(self, layer: int, q: torch.Tensor, window: int | None, scale: float | None) -> torch.Tensor:
        assert self.decode_tables is not None and self.decode_lens is not None
        b, h, dh = q.shape
        hkv = self.cache.num_kv_heads
        kernel = paged_decode_op() if q.device.type == "cpu" else None
        if kernel is not None:
            # On a CPU, our kernel reads every decode's keys in place through its block table (model/csrc/): no
            # gather, no mask. 16 bf16 decodes x 290 keys: 0.37 against 0.51 ms a layer (gather + SDPA here).
            qd = q.reshape(b, hkv, h // hkv, dh).contiguous()  # (B, Hkv, G, Dh)
            out = kernel(qd, self.cache.k[layer], self.cache.v[layer], self.decode_tables, self.decode_lens,
                         dh**-0.5 if scale is None else scale, -1 if window is None else window)  # (B, Hkv, G, Dh)
            return out.view(b, h, dh)  # (B, H, Dh)
        if self.decode_run is not None:
            keys, values = self.cache.run(layer, self.decode_run, self.decode_max_len)  # (1, S, Hkv, Dh) each
        else:
            keys, values = self.cache.gather(layer, self.decode_tables, self.decode_max_len)  # (B, S, Hkv, Dh) each
        # The query heads that share a KV head attend as that head's rows: (B, Hkv, G, Dh) against (B, Hkv, S, Dh),
        # half the (batch, head) tasks of a grouped-query call and no key expansion.
        qd = q.view(b, hkv, h // hkv, dh)  # (B, Hkv, G, Dh)
        kd, vd = keys.transpose(1, 2), values.transpose(1, 2)  # (B, Hkv, S, Dh)
        mask = self.decode_masks.get(window)  # (B, 1, 1, S) or None
        out = _sdpa(qd, kd, vd, mask, causal=False, scale=scale)  # (B, Hkv, G, Dh)
        return out.reshape(b, h, dh)  # (B, H, Dh)

    def _segment(self, layer: int, seg: Segment, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 window: int | None, scale: float | None) -> torch.Tensor:
        """One chunk's queries (T, H, Dh) against its sequence's keys -> (T, H, Dh)."""
        if seg.fresh:
            keys, values = k, v  # (T, Hkv, Dh): nothing cached before, no gather needed
        else:
            keys, values = self.cache.gather(layer, seg.table[None], seg.context_len)  # (1, S, Hkv, Dh)
            keys, values = keys[0], values[0]
        mask = None
        if not seg.fresh or window is not None or seg.spans:
            q_pos = torch.arange(seg.context_len - seg.num_tokens, seg.context_len, device=q.device)  # (T,)
            k_pos = torch.arange(seg.context_len, device=q.device)  # (S,)
            allowed = k_pos[None, :] <= q_pos[:, None]  # (T, S)
            for lo, hi in seg.spans:  # an image's tokens see each other both ways
                allowed |= ((q_pos >= lo) & (q_pos < hi))[:, None] & ((k_pos >= lo) & (k_pos < hi))[None, :]
            if window is not None:  # then the window, as transformers: AND(window, OR(causal, image span))
                allowed &= k_pos[None, :] > q_pos[:, None] - window
            mask = allowed[None, None]  # (1, 1, T, S)
        out = _sdpa(q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None], mask,
                    causal=True, scale=scale)  # (1, H, T, Dh)
        return out[0].transpose(0, 1)  # (T, H, Dh)


AttentionContext = DenseAttention | PagedBatch
