"""The incremental detokenizer: token ids in, text deltas out, for streaming a generated sequence.

`IncrementalDetokenizer` streams text deltas from token ids with the prefix/read offset algorithm (TGI
`decode_token`, vLLM `detokenize_incrementally`): it decodes a small window of recent tokens per step and holds back
output while the window ends in an incomplete UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# ------------------------------------------------------------------------------------------------------- detokenizer


class _Decoder(Protocol):
    def decode(self, ids: list[int], *, skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Token ids in, text deltas out; never emits half a character; special tokens are skipped.

    Invariant: the joined deltas of `push` for every id, plus `flush()`, equal
    `decode(ids, skip_special_tokens=True)` of all ids. Each step decodes only the tokens since the previous
    emission (`prefix_offset`) twice: without and with the unread ones (`read_offset`).

    The invariant holds for any ids with byte-level BPE. With SentencePiece byte-fallback tokens it holds whenever
    the bytes form valid UTF-8; for invalid byte runs (garbage output) only the number of U+FFFD may differ, since
    that decoder replaces a whole run after the fact.
    """

    def __init__(self, tokenizer: _Decoder, *, context_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        # Up to a few prompt tokens give the first generated token its left context (a SentencePiece "▁word"
        # keeps its space); they are never emitted.
        context = list(context_ids)[-5:]
        self._ids: list[int] = context  # only the window from prefix_offset on is kept
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_generated = 0

    @property
    def num_tokens(self) -> int:
        """Ids pushed so far."""
        return self._num_generated

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        self._num_generated += 1
        return self._advance(final=False)

    def push_many(self, token_ids: Sequence[int]) -> str:
        """Add several ids at once; return their joined delta."""
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """Whatever is still held back at the end of the sequence (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        window = self._ids[self._prefix_offset :]
        read = self._read_offset - self._prefix_offset
        prefix_text = self._tok.decode(window[:read], skip_special_tokens=True)
        new_text = self._tok.decode(window, skip_special_tokens=True)
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            if final:
                self._prefix_offset = self._read_offset = len(self._ids)
            return ""
        delta = new_text[len(prefix_text) :]
        # The emitted tokens become the next window's left context; older ids are dropped.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return delta
