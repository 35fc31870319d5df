"""Each step: which sequences advance, and by how many tokens, under a token budget and the free KV blocks.

Every sequence is "tokens to compute before the next sample": a decode has one, a new prompt has all of its tokens
(less what the prefix cache supplies), a preempted sequence has its prompt and its output so far. One policy covers
them all (vLLM v1's):

1. Running sequences first, oldest first: decodes take one token each; a prompt still being prefilled takes the next
   chunk that fits the budget. A sequence that needs a block when none is free preempts the youngest running
   sequence (its blocks are freed; it recomputes later, often from the prefix cache) until it fits.
2. Then waiting sequences, in arrival order (preempted ones at the front), while the budget, the free blocks and the
   rows (`max_running`) allow. A newly admitted prompt first reuses every leading block the prefix cache holds.

Chunks never end inside an image span, so that an image's visual tokens enter the model together (which the
bidirectional image attention of some families needs); a span longer than the budget goes whole.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache_manager import KVCacheManager
from .sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """One step's work: (sequence, tokens to compute), single-token ones first."""

    items: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # first admission this step

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


class Scheduler:
    def __init__(self, blocks: KVCacheManager, *, max_running: int, max_num_batched_tokens: int,
                 watermark: float = 0.01) -> None:
        self.blocks = blocks
        self.max_running = max_running
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_blocks = int(watermark * blocks.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the youngest
        self.free_rows = list(range(max_running - 1, -1, -1))  # a stack: lowest row on top
        self.num_preemptions = 0
        self._new_waiting = 0  # waiting sequences without a row: a plain int, read from other threads

    @property
    def num_new_waiting(self) -> int:
        """Waiting sequences that hold no row yet (preempted ones do)."""
        return self._new_waiting

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self._new_waiting += seq.row < 0

    # ------------------------------------------------------------------------------------------------ schedule
    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            while not self._reserve(seq, n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.items.append((seq, n))
                scheduled.add(id(seq))
                budget -= n
                i += 1
                continue
            # seq itself was preempted (it was the youngest): nothing after it is running any more
        if not out.preempted:
            while self.waiting and budget > 0:
                seq = self.waiting[0]
                if seq.row < 0 and not self.free_rows:
                    break
                n = self._admit(seq, budget, out)
                if not n:
                    break
                self.waiting.popleft()
                out.items.append((seq, n))
                budget -= n
        out.items.sort(key=lambda item: item[1] != 1)  # decodes first (stable: oldest first within each group)
        return out

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """How many of seq's remaining tokens to compute now: up to the budget, not ending inside an image span."""
        start = seq.num_computed
        end = min(seq.num_tokens, start + max(1, budget))
        for span in seq.spans_in(start, end):
            if span.start < end < span.end:
                end = span.start if span.start > start else span.end
        return end - start

    def _reserve(self, seq: Sequence, n: int) -> bool:
        """Allocate the blocks seq needs to hold num_computed + n tokens; False if too few are free."""
        need = self.blocks.blocks_for(seq.num_computed + n) - len(seq.block_table)
        if need <= 0:
            return True
        if not self.blocks.can_allocate(need):
            return False
        seq.block_table += self.blocks.allocate(need, after=seq.block_table[-1] if seq.block_table else None)
        return True

    def _admit(self, seq: Sequence, budget: int, out: ScheduledBatch) -> int:
        """Bring a waiting sequence in: prefix blocks from the cache, fresh blocks for its first chunk, a row.
        Returns the chunk's token count, or 0 if it cannot come in now."""
        bs = self.blocks.block_size
        if not seq.block_table:
            # Reuse cached full blocks, but leave at least the last token to compute: its logits give the sample.
            full = (seq.num_tokens - 1) // bs
            keys = [seq.key_of(b) for b in range(full)]
            hit = self.blocks.match(keys)
            self.blocks.hold(hit)
            seq.block_table = list(hit)
            seq.registered = len(hit)
            seq.num_computed = len(hit) * bs
        n = self._chunk(seq, budget)
        need = self.blocks.blocks_for(seq.num_computed + n) - len(seq.block_table)
        if need > self.blocks.num_free - (self.watermark_blocks if self.running else 0):
            self.blocks.free(seq.block_table)  # not now: give the prefix back (it stays cached)
            seq.block_table, seq.registered, seq.num_computed = [], 0, 0
            return 0
        seq.block_table += self.blocks.allocate(need, after=seq.block_table[-1] if seq.block_table else None)
        if seq.num_cached < 0:
            seq.num_cached = seq.num_computed
            self.blocks.record_lookup(seq.prompt_len, seq.num_cached)
            out.admitted.append(seq)
        if seq.row < 0:
            seq.row = self.free_rows.pop()
            self._new_waiting -= 1
        seq.status = Status.RUNNING
        self.running.append(seq)
        return n

    def _preempt(self, seq: Sequence, out: ScheduledBatch) -> None:
        """Free seq's blocks and send it back to the front of the queue: it recomputes what it had."""
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table, seq.registered, seq.num_computed = [], 0, 0
        seq.visual.clear()
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    # -------------------------------------------------------------------------------------------------- update
    def advance(self, seq: Sequence, n: int) -> None:
        """n more tokens of seq are in the cache: register the blocks that became full."""
        seq.num_computed += n
        full = seq.num_computed // self.blocks.block_size
        while seq.registered < full:
            b = seq.registered
            self.blocks.register(seq.block_table[b], seq.key_of(b))
            seq.registered += 1

    def finish(self, seq: Sequence) -> None:
        """seq is done (finished, failed or cancelled): free its blocks and its row."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
            self._new_waiting -= seq.row < 0
        if seq.block_table:
            self.blocks.free(seq.block_table)
            seq.block_table = []
        if seq.row >= 0:
            self.free_rows.append(seq.row)
            self.free_rows.sort(reverse=True)
            seq.row = -1
        seq.visual.clear()
        seq.status = Status.FINISHED
