"""From sampled ids to events: incremental detokenization, stop strings and stop ids, length limits, usage."""

from __future__ import annotations

import time

from vlmserve.model.tokenizer import ChatTokenizer

from .observer import EngineCounters, Observer
from .requests import EngineError, Event, Failed, Finished, InternalError, TextDelta, TokenLogprob, Usage
from .sequence import Sequence
from .stops import StopMatcher


class OutputProcessor:
    def __init__(self, tokenizer: ChatTokenizer, *, max_model_len: int, counters: EngineCounters,
                 observer: Observer) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(tokenizer.eos_token_ids)
        self.max_model_len = max_model_len
        self.counters, self.observer = counters, observer

    def accept(self, seq: Sequence, token: int, now: float, events: list[Event],
               logprob: TokenLogprob | None = None) -> str | None:
        """Take one sampled token (and its logprob, if the request asked): stream its text; return the finish
        reason if seq is done, else None."""
        if seq.detok is None or seq.stops is None:
            seq.detok = self.tokenizer.detokenizer(context_ids=seq.req.prompt_ids[-4:])
            seq.stops = StopMatcher(seq.req.stop)
        if seq.num_generated == 0:
            seq.first_token_at = now
            self.observer.first_token(now - seq.arrival)
        else:
            self.observer.inter_token(now - seq.last_token_at)
        seq.last_token_at = now
        seq.token_ids.append(token)
        if (token in self.eos_ids and not seq.req.ignore_eos) or token in seq.req.stop_token_ids:
            return "stop"
        seq.pending.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        text, hit = seq.stops.push(seq.detok.push(token))
        if text:
            seq.text.append(text)
            events.append(self._delta(seq, text))
        if hit:
            seq.stops = None  # the rest (held text included) is dropped
            return "stop"
        if seq.num_generated >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def finished(self, seq: Sequence, reason: str, events: list[Event]) -> None:
        """The closing events of a finished or cancelled sequence (the text held back for stop strings first)."""
        if reason != "cancelled" and seq.detok is not None and seq.stops is not None:
            rest, hit = seq.stops.push(seq.detok.flush())
            rest += "" if hit else seq.stops.flush()
            if rest or seq.pending:
                seq.text.append(rest)
                events.append(self._delta(seq, rest))
        usage = Usage(seq.prompt_len, seq.num_generated, max(0, seq.num_cached),
                      sum(img.num_tokens for img in seq.req.images))
        if reason == "cancelled":
            self.counters.requests_cancelled += 1
            self.observer.request_cancelled()
        else:
            self.counters.requests_finished += 1
            self.counters.prompt_tokens += usage.prompt_tokens
            self.counters.completion_tokens += usage.completion_tokens
            self.observer.request_finished(time.monotonic() - seq.arrival, reason, usage.prompt_tokens,
                                           usage.completion_tokens)
        events.append(Finished(seq.request_id, reason, usage, "".join(seq.text), tuple(seq.generated),
                               tuple(seq.logprobs)))

    @staticmethod
    def _delta(seq: Sequence, text: str) -> TextDelta:
        """The delta of `text`, with the tokens (and logprobs) accepted since the last one."""
        delta = TextDelta(seq.request_id, text, tuple(seq.pending), tuple(seq.logprobs[seq.reported :]))
        seq.pending.clear()
        seq.reported = len(seq.logprobs)
        return delta

    def failed(self, seq: Sequence, error: Exception, events: list[Event]) -> None:
        self.counters.requests_failed += 1
        err = error if isinstance(error, EngineError) else InternalError(str(error))
        events.append(Failed(seq.request_id, err))
