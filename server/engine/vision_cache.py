"""An LRU cache of projected visual tokens, bounded in bytes, keyed by image content.

The key is (model id, hash of the image's bytes): two requests that send the same image share the encoder's work,
and an image never borrows another image's tokens (a prompt-id keyed cache would, since every image's placeholder
ids are identical). Only the engine's loop thread touches it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class VisionCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._entries

    def get(self, key: tuple[str, str]) -> torch.Tensor | None:
        """The cached tokens (N_vis, D), counting a hit or a miss."""
        tokens = self._entries.get(key)
        if tokens is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return tokens

    def put(self, key: tuple[str, str], tokens: torch.Tensor) -> None:
        """Store (N_vis, D) tokens, evicting the least recently used entries past the byte budget."""
        size = tokens.numel() * tokens.element_size()
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        self._entries[key] = tokens
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
            self.evictions += 1
