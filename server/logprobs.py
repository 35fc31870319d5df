"""OpenAI's `logprobs` objects from the engine's token log-probabilities: `{"content": [{"token", "logprob", "bytes",
"top_logprobs": [...]}], "refusal": null}`, per streamed chunk or for the whole answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlmserve.model.token_pieces import TokenPieces

from .engine.requests import TokenLogprob


def _entry(pieces: TokenPieces, token_id: int, logprob: float) -> dict[str, Any]:
    text, data = pieces.piece(token_id)
    return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(data)}  # -inf is not JSON


def choice_logprobs(pieces: TokenPieces, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The `logprobs` of a choice (or of a chunk's choice) covering these tokens."""
    content = []
    for lp in logprobs:
        entry = _entry(pieces, lp.token_id, lp.logprob)
        entry["top_logprobs"] = [_entry(pieces, t, v) for t, v in lp.top]
        content.append(entry)
    return {"content": content, "refusal": None}
