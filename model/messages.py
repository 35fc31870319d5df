"""Chat messages: the typed form of an OpenAI-style conversation and its parsing from request JSON.

A conversation is a list of `ChatMessage`s (role system / user / assistant / tool), each with a plain string or a
tuple of `TextPart` and `ImagePart` content parts; an assistant turn may carry the `ToolCall`s it made, and a tool turn
names the call it answers. `parse_messages` turns request dicts into them, refusing unknown roles and
part types, and cleans text of lone surrogates on the way (`clean_text`). An image part only marks where an image
sits; the images of a conversation are numbered in message order, as `ChatTokenizer.encode_chat` places them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_ROLES = frozenset({"system", "user", "assistant", "tool"})
_IMAGE_PART_TYPES = frozenset({"image", "image_url", "input_image"})
_AUDIO_PART_TYPES = frozenset({"audio", "input_audio"})
MAX_NESTING = 64  # JSON that tools and tool calls may nest (deeper is no function's schema, only an attack)


# ----------------------------------------------------------------------------------------------------------- messages


def clean_text(text: str) -> str:
    """`text` as valid Unicode: JSON can carry lone surrogates (\\ud800), which no tokenizer accepts; each becomes
    U+FFFD, while proper surrogate pairs are joined into their character."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@dataclass(frozen=True)
class TextPart:
    """A text content part (lone surrogates replaced, see `clean_text`)."""

    text: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", clean_text(self.text))


@dataclass(frozen=True)
class ImagePart:
    """Marks where an image sits in a message; the pixels are handled elsewhere (model/images.py)."""

    url: str | None = None


@dataclass(frozen=True)
class AudioPart:
    """Marks where an audio clip sits in a message; the samples are handled elsewhere (model/audio_decode.py)."""


Part = TextPart | ImagePart | AudioPart


@dataclass(frozen=True)
class ToolCall:
    """A function call an assistant turn made: `arguments` as the template sees them (an object, as transformers'
    templates expect; text that is not a JSON object stays text)."""

    id: str
    name: str
    arguments: Any


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn; `content` is a plain string or a sequence of parts. An assistant turn may carry `tool_calls`;
    a tool turn answers the call `tool_call_id`."""

    role: str
    content: str | tuple[Part, ...]
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None  # OpenAI's participant name (templates that read `message.name` show it)

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise ValueError(f"unsupported message role {self.role!r}; expected one of {sorted(_ROLES)}")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool calls, not {self.role!r} ones")
        object.__setattr__(self, "tool_calls", tuple(self.tool_calls))
        if isinstance(self.content, str):
            object.__setattr__(self, "content", clean_text(self.content))
        else:
            object.__setattr__(self, "content", tuple(self.content))

    @property
    def num_images(self) -> int:
        """Image parts in this message."""
        return 0 if isinstance(self.content, str) else sum(isinstance(p, ImagePart) for p in self.content)

    @property
    def num_audios(self) -> int:
        """Audio parts in this message."""
        return 0 if isinstance(self.content, str) else sum(isinstance(p, AudioPart) for p in self.content)


def parse_part(part: Part | Mapping[str, Any]) -> Part:
    """One OpenAI content part (`{"type": "text", "text": ...}`, `{"type": "image_url", ...}`) as a typed part."""
    if isinstance(part, TextPart | ImagePart | AudioPart):
        return part
    if not isinstance(part, Mapping):
        raise ValueError(f"content part must be an object, got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError("text content part needs a string 'text'")
        return TextPart(text)
    if kind in _IMAGE_PART_TYPES:
        ref = part.get("image_url", part.get("url"))
        if isinstance(ref, Mapping):
            ref = ref.get("url")
        return ImagePart(url=ref if isinstance(ref, str) else None)
    if kind in _AUDIO_PART_TYPES:
        return AudioPart()
    raise ValueError(f"unsupported content part type {kind!r}")


def parse_message(message: ChatMessage | Mapping[str, Any]) -> ChatMessage:
    """An OpenAI-style message dict (or a `ChatMessage`) as a `ChatMessage`."""
    if isinstance(message, ChatMessage):
        return message
    if not isinstance(message, Mapping):
        raise ValueError(f"message must be an object, got {type(message).__name__}")
    content = message.get("content")
    if content is None:
        content = ""
    if not isinstance(content, str):
        if isinstance(content, Mapping) or not isinstance(content, Sequence):
            raise ValueError("message content must be a string or a list of parts")
        content = tuple(parse_part(p) for p in content)
    calls = tuple(_parse_tool_call(c) for c in message.get("tool_calls") or ())
    call_id = message.get("tool_call_id")
    name = message.get("name")
    return ChatMessage(role=str(message.get("role")), content=content, tool_calls=calls,
                       tool_call_id=clean_text(str(call_id)) if call_id is not None else None,
                       name=clean_text(str(name)) if name is not None else None)


def nesting_depth(value: Any) -> int:
    """How deep JSON-like `value` nests (a scalar is 0), counted without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, Mapping) else node if isinstance(node, list | tuple) else None
        if children is None:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _parse_tool_call(call: ToolCall | Mapping[str, Any]) -> ToolCall:
    """OpenAI's `{"id", "type": "function", "function": {"name", "arguments": "<JSON text>"}}` as a `ToolCall`."""
    if isinstance(call, ToolCall):
        return call
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        raise ValueError("a tool call is an object with a 'function' object")
    function = call["function"]
    name, arguments = function.get("name"), function.get("arguments", "{}")
    if not isinstance(name, str):
        raise ValueError("a tool call's function needs a string 'name'")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments or "{}")
            if isinstance(parsed, dict) and nesting_depth(parsed) <= MAX_NESTING:
                arguments = parsed
        except (ValueError, RecursionError):
            pass  # not JSON (or absurdly deep): the template gets the text as it was sent
    return ToolCall(id=clean_text(str(call.get("id") or "")), name=clean_text(name), arguments=clean_strings(arguments))


def clean_strings(value: Any) -> Any:
    """JSON-like `value` with every string in it (keys too) made valid Unicode (`clean_text`)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, Mapping):
        return {clean_strings(k): clean_strings(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_strings(v) for v in value]
    return value


def parse_messages(messages: Sequence[ChatMessage | Mapping[str, Any]]) -> list[ChatMessage]:
    """Parse a whole conversation; it must not be empty."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    return [parse_message(m) for m in messages]


def count_images(messages: Sequence[ChatMessage | Mapping[str, Any]]) -> int:
    """Number of image parts in a conversation, in the order `encode_chat` places them."""
    return sum(m.num_images for m in parse_messages(messages))
