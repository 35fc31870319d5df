"""Tool calls in model output: a parser per format (vLLM's `--tool-call-parser` names) and the grammar that makes a
call valid by construction when the request forces one (`tool_choice` "required" or a named function, or strict
schemas).

A parser reads the text generated so far and tells what of it is surely content and which calls it holds, each call's
arguments as the JSON text the model wrote. What it reads from a prefix of the text is a prefix of what it reads from
the whole (the content, the list of calls, each call's arguments), so a stream sends the growth of each as OpenAI's
deltas (`ToolCallStream`) and an answer reads the same streamed or not.

- `hermes` (Qwen 2.5 / 3, Hermes, our llava-1.5 default template): `<tool_call>\\n{"name": ..., "arguments": {...}}
  \\n</tool_call>`, any number of them, after optional content.
- `llama3_json` (Llama 3.1 / 3.2): the whole answer is `{"name": ..., "parameters": {...}}`, calls joined by `; `;
  an answer that does not start with `{` is content.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vlmserve.model.messages import clean_text

from .engine.structured import close_objects

# Where a call's arguments begin: `{"name": "<name>", "arguments": ` (or "parameters"), whitespace anywhere.
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_SEPARATOR = re.compile(r"\s*;?\s*")
_DECODER = json.JSONDecoder()
_COMPACT_JSON = {"whitespace_flexible": False}  # llguidance: no whitespace freedom to wander off with


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # the arguments' JSON text, as written so far


@dataclass(frozen=True)
class Parsed:
    content: str
    calls: tuple[ParsedCall, ...] = ()


@dataclass(frozen=True)
class ToolSpec:
    """One function a request offers: its name and its parameters' JSON schema."""

    name: str
    parameters: dict[str, Any]


class ToolParser(Protocol):
    name: str

    def parse(self, text: str, final: bool, names: frozenset[str] | None = None) -> Parsed:
        """What `text` (the output so far; all of it when `final`) surely holds; with `names`, a call of any other
        function is no call (it stays content)."""
        ...

    def grammar(self, tools: Sequence[ToolSpec], *, one: bool, or_text: bool) -> str:
        """Lark (llguidance) for calls of `tools`: exactly one when `one`, else one or more; with `or_text`, free
        content is allowed instead of calls."""
        ...


def _held(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag` (held back until the next delta)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _text(value: str) -> str:
    """Model text as valid Unicode (a lone surrogate written as a JSON escape becomes U+FFFD)."""
    return clean_text(value)


def _json_value(raw: str) -> tuple[Any, int, int] | None:
    """The JSON value at the start of `raw` (after whitespace): (value, start, end), or None if it is not there
    whole (still being written, broken, or absurdly deep)."""
    start = len(raw) - len(raw.lstrip())
    try:
        value, end = _DECODER.raw_decode(raw, start)
    except (ValueError, RecursionError):
        return None
    return value, start, end


def _call(body: str, complete: bool, names: frozenset[str] | None = None) -> ParsedCall | None:
    """One call from its JSON text, whole (`complete`) or so far; None while it cannot be told, or if it is no call.

    Once the header (name, then the arguments key) is read, the call is known and its arguments grow as written: all
    of them while their JSON value is open, then exactly that value's text."""
    header = _HEADER.match(body)
    if header is not None:
        try:
            name = _text(json.loads(header.group(1)))
        except ValueError:  # an invalid escape in the name: no call
            header = None
    if header is not None and names is not None and name not in names:
        return None  # a function that was not offered: no call (known from the header, so a stream never sent it)
    if header is not None:
        raw = body[header.end():]
        value = _json_value(raw)
        if value is not None and isinstance(value[0], str):
            return ParsedCall(name, _text(value[0]))  # arguments written as a JSON string
        if value is not None:
            return ParsedCall(name, _text(raw[value[1]: value[2]]))
        if raw.lstrip().startswith(("{", "[")):
            if complete:  # cut short or broken: what was written, without the call's own closing brace
                end = raw.strip()
                return ParsedCall(name, _text(end[:-1].rstrip() if end.endswith("}}") else end))
            return ParsedCall(name, _text(raw.strip()))
        return ParsedCall(name, "")  # not begun yet (or no JSON there): nothing more to tell
    if not complete:
        return None
    found = _json_value(body)
    if found is None or not isinstance(found[0], dict) or not isinstance(found[0].get("name"), str):
        return None
    obj = found[0]
    arguments = obj.get("arguments", obj.get("parameters", {}))
    try:
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    except (ValueError, RecursionError):
        return None
    if names is not None and obj["name"] not in names:
        return None
    return ParsedCall(_text(obj["name"]), _text(text))


def _end_of_block(text: str, start: int, tag: str) -> int:
    """Where `tag` first stands in `text` after `start` outside JSON strings (a call's arguments may hold the closing
    tag in a string), or -1."""
    if text.find(tag, start) < 0:  # the common case while a call streams: no closing tag yet, no scan
        return -1
    in_string, i, n = False, start, len(text)
    while i < n:
        ch = text[i]
        if in_string:
            if ch == "\\":
                i += 2
                continue
            in_string = ch != '"'
        elif ch == '"':
            in_string = True
        elif ch == tag[0] and text.startswith(tag, i):
            return i
        i += 1
    return -1


def _call_grammar(tools: Sequence[ToolSpec], arguments_key: str) -> str:
    """Lark alternatives for one call of any of `tools`: `{"name":"<name>","<key>":` + the parameters' own JSON
    schema (its own root, so that its `$ref`s resolve) + `}`."""
    def one(t: ToolSpec) -> str:
        head = json.dumps(f'{{"name":{json.dumps(t.name)},"{arguments_key}":')
        schema = json.dumps({"x-guidance": _COMPACT_JSON, **close_objects(t.parameters)}, ensure_ascii=False)
        return f'{head} %json{schema} "}}"'

    return " | ".join(f"({one(t)})" for t in tools)


class HermesParser:
    name = "hermes"
    open, close = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool, names: frozenset[str] | None = None) -> Parsed:
        start = text.find(self.open)
        if start < 0:
            return Parsed(text if final else text[: len(text) - _held(text, self.open)])
        content, calls = [text[:start]], []
        pos = start
        while pos >= 0:
            body_start = pos + len(self.open)
            end = _end_of_block(text, body_start, self.close)
            if end < 0:  # the last call, still open (or cut short by the end of the answer)
                body = text[body_start:]
                call = _call(body[: len(body) - _held(body, self.close)], final, names)  # a cut-off closing tag
                if call is not None:
                    calls.append(call)
                elif final:
                    content.append(text[pos:])
                break
            call = _call(text[body_start:end], True, names)
            if call is not None:
                calls.append(call)
            else:  # a block that holds no call is content
                content.append(text[pos: end + len(self.close)])
            after = end + len(self.close)
            pos = text.find(self.open, after)
            if pos >= 0 or final:  # text between calls counts once the next call (or the end) shows it is done
                content.append(text[after: pos if pos >= 0 else len(text)].strip())
        return Parsed("".join(content), tuple(calls))

    def grammar(self, tools: Sequence[ToolSpec], *, one: bool, or_text: bool) -> str:
        call = f'"{self.open}\\n" ({_call_grammar(tools, "arguments")}) "\\n{self.close}"'
        calls = "call" if one else 'call ("\\n" call)*'
        # content is any text without the opening tag (so that no call hides in it)
        text = f"TEXT: /(.|\\n)+/ & ~/(.|\\n)*{self.open}(.|\\n)*/"
        start = f"start: TEXT | {calls}\n{text}" if or_text else f"start: {calls}"
        return f"{start}\ncall: {call}\n"


class Llama3JsonParser:
    name = "llama3_json"
    python_tag = "<|python_tag|>"

    def parse(self, text: str, final: bool, names: frozenset[str] | None = None) -> Parsed:
        pos = len(text) - len(text.lstrip())
        if text.startswith(self.python_tag, pos):
            pos += len(self.python_tag)
            pos += len(text[pos:]) - len(text[pos:].lstrip())
        if pos == len(text) or (not final and self.python_tag.startswith(text[pos:])):
            return Parsed(text if final else "")  # nothing yet, or (part of) the python tag: not told yet
        if text[pos] != "{":
            return Parsed(text)
        calls: list[ParsedCall] = []
        while pos < len(text):
            try:
                _, end = _DECODER.raw_decode(text, pos)
            except (ValueError, RecursionError):  # an object still being written (or cut short, or broken)
                call = _call(text[pos:], final, names)
                if call is not None:
                    calls.append(call)
                elif final:
                    return Parsed(text[pos:] if calls else text, tuple(calls))
                break
            call = _call(text[pos:end], True, names)
            if call is None:  # JSON that is no call: the answer is content (once the first object shows it)
                return Parsed(text, ()) if not calls else Parsed(text[pos:] if final else "", tuple(calls))
            calls.append(call)
            pos = _SEPARATOR.match(text, end).end()  # type: ignore[union-attr]
            if pos < len(text) and text[pos] != "{":
                return Parsed(text[pos:] if final else "", tuple(calls))
        return Parsed("", tuple(calls))

    def grammar(self, tools: Sequence[ToolSpec], *, one: bool, or_text: bool) -> str:
        calls = "call" if one else 'call ("; " call)*'
        # content is any text that does not open like a call (a `{`, after whitespace or the python tag)
        text = "TEXT: /(.|\\n)+/ & ~/\\s*(<\\|python_tag\\|>)?\\s*\\{(.|\\n)*/"
        start = f"start: TEXT | {calls}\n{text}" if or_text else f"start: {calls}"
        return f"{start}\ncall: {_call_grammar(tools, 'parameters')}\n"


PARSERS: dict[str, ToolParser] = {p.name: p for p in (HermesParser(), Llama3JsonParser())}


def parser_for_template(template: str) -> str:
    """The parser a chat template's call format asks for: `<tool_call>` tags -> hermes; Llama 3's python tag or
    `"parameters"` calls -> llama3_json; otherwise hermes (the format our default template teaches)."""
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or '"parameters"' in template:
        return "llama3_json"
    return "hermes"


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


class ToolCallStream:
    """One choice's text deltas as OpenAI's chat deltas: content once it is surely content, each call's id and name
    once, then its arguments as they grow. `limit` keeps only the first calls (`parallel_tool_calls: false`)."""

    def __init__(self, parser: ToolParser, limit: int | None = None, names: frozenset[str] | None = None) -> None:
        self.parser, self.limit, self.names = parser, limit, names
        self.text = ""
        self.content_sent = 0
        self.ids: list[str] = []
        self.arguments_sent: list[int] = []

    def feed(self, text: str, final: bool = False) -> list[dict[str, Any]]:
        self.text += text
        parsed = self.parser.parse(self.text, final, self.names)
        deltas: list[dict[str, Any]] = []
        if len(parsed.content) > self.content_sent:
            deltas.append({"content": parsed.content[self.content_sent:]})
            self.content_sent = len(parsed.content)
        for i, call in enumerate(parsed.calls[: self.limit]):
            if i == len(self.ids):
                self.ids.append(new_call_id())
                self.arguments_sent.append(len(call.arguments))
                deltas.append({"tool_calls": [{"index": i, "id": self.ids[i], "type": "function",
                                               "function": {"name": call.name, "arguments": call.arguments}}]})
            elif len(call.arguments) > self.arguments_sent[i]:
                deltas.append({"tool_calls": [{"index": i, "function": {
                    "arguments": call.arguments[self.arguments_sent[i]:]}}]})
                self.arguments_sent[i] = len(call.arguments)
        return deltas

    @property
    def called(self) -> bool:
        return bool(self.ids)
