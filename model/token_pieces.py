"""The text and the bytes of single tokens, as OpenAI's logprobs report them (`token`, `bytes`).

A token is not always whole text: a byte-level BPE token may hold half of a UTF-8 character, a SentencePiece
vocabulary falls back to `<0xNN>` byte tokens. The bytes are therefore read from the vocabulary entry itself (the
byte-level alphabet mapped back, or the fallback byte), and the text is those bytes decoded with replacement, so that
the bytes of consecutive tokens join to the exact UTF-8 of the completion even where one token's text cannot.
"""

from __future__ import annotations

import functools
import json
import re

from tokenizers import Tokenizer

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 byte values, mapped back to the bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenPieces:
    """`piece(id)`: (text, UTF-8 bytes) of one token id, cached."""

    def __init__(self, backend: Tokenizer) -> None:
        self.backend = backend
        self.byte_level = "ByteLevel" in json.dumps(json.loads(backend.to_str()).get("decoder"))

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one instance per tokenizer, alive as long as the server)
    def piece(self, token_id: int) -> tuple[str, bytes]:
        raw = self.backend.id_to_token(token_id)
        if raw is None:
            return "", b""
        alphabet = _byte_level_alphabet()
        if self.byte_level and all(c in alphabet for c in raw):
            data = bytes(alphabet[c] for c in raw)
        elif match := _BYTE_TOKEN.match(raw):
            data = bytes([int(match.group(1), 16)])
        else:
            data = raw.replace("\u2581", " ").encode()  # SentencePiece's word boundary is a space
        return data.decode("utf-8", errors="replace"), data
