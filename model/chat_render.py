"""The pieces `ChatTokenizer` renders and escapes chats with: the private-use sentinels that stand for control-token
strings inside client text while the template renders, the HF message shape templates read (tool calls and tool
turns included), the walk over every client-written string of a chat, and the image parts' slot counts and text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from .messages import AudioPart, ChatMessage, TextPart

_PRIVATE_USE = range(0xE000, 0xF900)  # Unicode private use area: sentinel characters come from here


@dataclass(frozen=True)
class Sentinel:
    """`open + index + close` stands for control token `index` inside message text while the template renders."""

    open: str
    close: str

    @classmethod
    def choose(cls, reserved: frozenset[str], texts: Sequence[str]) -> Sentinel:
        used = set(reserved).union(*texts)
        free = (chr(c) for c in _PRIVATE_USE if chr(c) not in used)
        try:
            return cls(next(free), next(free))
        except StopIteration:  # every private-use character already appears in the input
            raise ValueError("message text uses every private-use character; cannot encode it safely") from None

    def wrap(self, index: int) -> str:
        return f"{self.open}{index}{self.close}"

    def occurs_in(self, text: str) -> bool:
        return self.open in text or self.close in text

    def restore(self, text: str, tokens: Sequence[str]) -> str:
        pattern = f"{re.escape(self.open)}([0-9]+){re.escape(self.close)}"
        text = re.sub(pattern, lambda m: tokens[int(m.group(1))], text)
        # A template that cut a sentinel in half leaves stray halves: they are ours, drop them.
        return text.replace(self.open, "").replace(self.close, "")


def without_first_prepend(backend: Tokenizer) -> Tokenizer:
    """`backend` with every Metaspace prepend_scheme "first" turned to "never" (itself when there is none)."""
    spec = json.loads(backend.to_str())
    changed = False

    def visit(node: Any) -> None:
        nonlocal changed
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                node["prepend_scheme"] = "never"
                changed = True
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(spec.get("pre_tokenizer"))
    if not changed:
        return backend
    inner = Tokenizer.from_str(json.dumps(spec))
    inner.encode_special_tokens = True
    return inner


def client_texts(messages: list[ChatMessage], tools: Sequence[Mapping[str, Any]] | None = None) -> list[str]:
    """Every client-written text of a chat: its messages', its tool calls' and its tool definitions'."""
    out: list[str] = []
    for m in messages:
        if isinstance(m.content, str):
            out.append(m.content)
        else:
            out.extend(p.text for p in m.content if isinstance(p, TextPart))
        out.extend(strings_in([(c.id, c.name, c.arguments) for c in m.tool_calls]))
        out.extend(t for t in (m.tool_call_id, m.name) if t is not None)
    out.extend(strings_in(list(tools or ())))
    return out


def strings_in(value: Any) -> Iterator[str]:
    """Every string in `value` (JSON-like), keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from strings_in(k)
            yield from strings_in(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from strings_in(v)


def map_strings(value: Any, transform: Callable[[str], str]) -> Any:
    """`value` (JSON-like) with `transform` applied to every string in it, keys included."""
    if isinstance(value, str):
        return transform(value)
    if isinstance(value, Mapping):
        return {map_strings(k, transform): map_strings(v, transform) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [map_strings(v, transform) for v in value]
    return value


def to_hf(message: ChatMessage, transform: Callable[[str], str]) -> dict[str, Any]:
    """A message as HF templates expect it: string content stays a string, parts become text/image dicts; tool
    calls as `{"id", "type": "function", "function": {"name", "arguments": {...}}}`, a tool turn with its call id."""
    if isinstance(message.content, str):
        out: dict[str, Any] = {"role": message.role, "content": transform(message.content)}
    else:
        parts = [
            {"type": "text", "text": transform(p.text)} if isinstance(p, TextPart) else
            {"type": "audio", "audio": ""} if isinstance(p, AudioPart) else {"type": "image"}
            for p in message.content  # the key `audio`: Qwen2-Audio's template tests `'audio' in content`
        ]
        out = {"role": message.role, "content": parts}
    if message.tool_calls:
        out["tool_calls"] = [{"id": transform(c.id), "type": "function", "function": {
            "name": transform(c.name), "arguments": map_strings(c.arguments, transform)}} for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = transform(message.tool_call_id)
    if message.name is not None:
        out["name"] = transform(message.name)
    return out


def image_token_counts(num_image_tokens: int | Sequence[int], n_images: int) -> list[int]:
    if isinstance(num_image_tokens, int):
        counts = [num_image_tokens] * n_images
    else:
        counts = [int(n) for n in num_image_tokens]
        if len(counts) != n_images:
            raise ValueError(f"got {len(counts)} image token counts for {n_images} image part(s)")
    if any(n <= 0 for n in counts):
        raise ValueError("every image needs a positive number of visual tokens")
    return counts


def image_view_counts(num_image_tokens: int | Sequence[int | Sequence[int]], n_images: int) -> list[tuple[int, ...]]:
    """Each image part's views' slot counts: an int is one view, a sequence the counts of the image's views."""
    if isinstance(num_image_tokens, int):
        return [(n,) for n in image_token_counts(num_image_tokens, n_images)]
    views = [(v,) if isinstance(v, int) else tuple(int(n) for n in v) for v in num_image_tokens]
    if len(views) != n_images:
        raise ValueError(f"got {len(views)} image token counts for {n_images} image part(s)")
    if any(not v or min(v) <= 0 for v in views):
        raise ValueError("every image view needs a positive number of visual tokens")
    return views


def wrap_images(prompt: str, mark: str, text: Callable[[int], str], crops: Sequence[int]) -> str:
    """`prompt` with each image's `mark` (in order) rewritten as `text` of its number of crops, as a processor that
    rewrites the prompt's text does (Gemma 3's: model/pan_and_scan.py `image_text`)."""
    pieces = prompt.split(mark)
    if len(pieces) - 1 != len(crops):
        if any(crops):
            raise ValueError(f"the chat template wrote {len(pieces) - 1} image mark(s) {mark!r} for {len(crops)} "
                             "image part(s); they must match one to one")
        return text(0).join(pieces)  # the placeholder checks say what is wrong
    out = [pieces[0]]
    for n, piece in zip(crops, pieces[1:], strict=True):
        out += [text(n), piece]
    return "".join(out)
