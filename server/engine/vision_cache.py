"""An LRU cache of projected visual tokens, bounded in bytes, keyed by image content.

The key is (model id, hash of the image's bytes): two requests that send the same image share the encoder's work,
and an image never borrows another image's tokens (a prompt-id keyed cache would, since every image's placeholder
ids are identical). The HTTP layer may *pin* an entry before it skips decoding an image it knows is cached; a pinned
entry is never evicted until the engine has used it and unpinned it. Thread-safe.
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
        self._pins: dict[Key, int] = {}
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

    def pin(self, key: Key) -> bool:
        """Keep `key` from eviction if it is cached; returns whether it was (then `unpin` it once used)."""
        with self._lock:
            if key not in self._entries:
                return False
            self._pins[key] = self._pins.get(key, 0) + 1
            return True

    def unpin(self, key: Key) -> None:
        with self._lock:
            n = self._pins.get(key, 0) - 1
            if n > 0:
                self._pins[key] = n
            else:
                self._pins.pop(key, None)
            self._evict()

    def put(self, key: Key, tokens: torch.Tensor) -> None:
        """Store (N_vis, D) tokens, evicting the least recently used unpinned entries past the byte budget."""
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
            if key in self._pins:
                continue
            evicted = self._entries.pop(key)
            self.bytes -= evicted.numel() * evicted.element_size()
            self.evictions += 1
