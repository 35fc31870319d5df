"""An LRU cache of projected visual tokens, bounded in bytes, keyed by image content.

The key is (model id, hash of the image's bytes): two requests that send the same image share the encoder's work,
and an image never borrows another image's tokens (a prompt-id keyed cache would, since every image's placeholder
ids are identical). The key also carries the request's cache salt, so tenants never share visual tokens. The HTTP
layer may take an entry's tokens (a lease: `Engine.lease_image`) before it skips decoding the image; the request then
holds the tensor itself, so a later eviction cannot take it away. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

Key = tuple[str, str]


class VisionCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Key, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def get(self, key: Key) -> torch.Tensor | None:
        """The cached tokens (N_vis, D), counting a hit or a miss."""
        with self._lock:
            tokens = self._entries.get(key)
            if tokens is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return tokens

    def put(self, key: Key, tokens: torch.Tensor) -> None:
        """Store (N_vis, D) tokens, evicting the least recently used entries past the byte budget."""
        size = tokens.numel() * tokens.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.numel() * old.element_size()
            self._entries[key] = tokens
            self.bytes += size
            self._evict()

    def _evict(self) -> None:
        if self.bytes <= self.max_bytes:
            return
        for key in list(self._entries):
            if self.bytes <= self.max_bytes:
                break
            evicted = self._entries.pop(key)
            self.bytes -= evicted.numel() * evicted.element_size()
            self.evictions += 1
