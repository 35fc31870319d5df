"""KV blocks: who holds which, reference counts, and prefix reuse by content keys (nano-vllm's block manager, with
image content in the key as vLLM's multimodal hasher puts it).

A full block gets a key that chains its parent block's key, its token ids and, for every image whose visual tokens
it covers, the image's content key and the offset of the block inside the image. The root of the chain is the model
id and the request's cache salt. Two prompts therefore share a block only if everything before and in it is the
same: the same text, the same images (an image differing in one pixel has another key), the same model and salt.
Placeholder ids alone never match, since every image's placeholders are the same id.

Free blocks stay in an LRU list with their keys: a block whose last holder finished can still be found and reused
until the pool needs it for something new (the least recently freed goes first, and a sequence's blocks are freed
deepest first, so a shared prefix outlives its continuations).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

BlockKey = bytes


def root_key(model_id: str, salt: str) -> BlockKey:
    """The parent key of a sequence's first block."""
    return hashlib.blake2b(f"{model_id}\x00{salt}".encode(), digest_size=16, person=b"vlmserve-root").digest()


def block_key(parent: BlockKey, token_ids: Sequence[int], images: Sequence[tuple[str, int]] = ()) -> BlockKey:
    """The key of a full block: parent key, its token ids, and (image key, offset in the image) of covered images."""
    h = hashlib.blake2b(parent, digest_size=16, person=b"vlmserve-block")
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    for key, offset in images:
        h.update(b"\x00img\x00" + key.encode() + struct.pack("<q", offset))
    return h.digest()


@dataclass
class Block:
    id: int
    ref_count: int = 0
    key: BlockKey | None = None  # set once full and registered; kept while free, until the block is reused


class KVCacheManager:
    """A pool of `num_blocks` blocks of `block_size` tokens."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU order: head goes first
        self._cached: dict[BlockKey, int] = {}  # key -> block id, for free and held blocks alike
        self.prefix_queries = 0  # prompt tokens of admitted requests
        self.prefix_hits = 0  # of those, tokens found in the cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of blocks held by some sequence (free blocks that still cache a prefix count as free)."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -------------------------------------------------------------------------------------------------- lookup
    def match(self, keys: Sequence[BlockKey]) -> list[int]:
        """Block ids of the leading `keys` that are cached (not yet held for the caller: see `hold`)."""
        found: list[int] = []
        if self.enable_prefix_caching:
            for key in keys:
                block_id = self._cached.get(key)
                if block_id is None:
                    break
                found.append(block_id)
        return found

    def record_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        """Count one admitted request's prompt tokens and how many of them the cache supplied."""
        self.prefix_queries += prompt_tokens
        self.prefix_hits += hit_tokens

    def hold(self, block_ids: Sequence[int]) -> None:
        """Take a reference to cached blocks found by `match` (taking free ones out of the free list)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    # ------------------------------------------------------------------------------------------- allocate/free
    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int, *, after: int | None = None) -> list[int]:
        """`n` fresh blocks (forgetting whatever prefix they cached), or ValueError if there are not enough.

        `after`: the sequence's last block. Where the block right after it is free and caches nothing, it is taken
        out of turn (no cached prefix is lost by that), so that a sequence's blocks tend to lie in one run and
        its keys can be read in place (model/kv_cache.py); otherwise blocks come in LRU order."""
        if n > len(self._free):
            raise ValueError(f"{n} blocks asked for, {len(self._free)} free")
        out = []
        for _ in range(n):
            nxt = None if after is None else after + 1
            if nxt is not None and nxt in self._free and self.blocks[nxt].key is None:
                block_id = nxt
                del self._free[nxt]
            else:
                block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.key is not None:
                if self._cached.get(block.key) == block_id:
                    del self._cached[block.key]
                block.key = None
            block.ref_count = 1
            out.append(block_id)
            after = block_id
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced blocks join the free list, the last block first."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed more often than held")
            if block.ref_count == 0:
                self._free[block_id] = None

    def register(self, block_id: int, key: BlockKey) -> None:
        """A block just became full with the content `key` describes: make it findable by `match`."""
        if not self.enable_prefix_caching:
            return
        block = self.blocks[block_id]
        if key in self._cached and self._cached[key] != block_id:
            return  # another block already caches this content (two requests computed it at once): keep that one
        block.key = key
        self._cached[key] = block_id
