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

from .engine.structured import close_objects

# Where a call's arguments begin: `{"name": "<name>", "arguments": ` (or "parameters"), whitespace anywhere.
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_SEPARATOR = re.compile(r"\s*;?\s*")
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

    def parse(self, text: str, final: bool) -> Parsed:
        """What `text` (the output so far; all of it when `final`) surely holds."""
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


def _call(body: str, complete: bool) -> ParsedCall | None:
    """One call from its JSON text, whole (`complete`) or so far; None while it cannot be told, or if it is no call.

    Once the header (name, then the arguments key) is read, the call is known and its arguments grow as written, up to
    before the last `}` seen (that one may close the call itself)."""
    header = _HEADER.match(body)
    if header is not None:
        name, raw = json.loads(header.group(1)), body[header.end():]
        if raw.lstrip().startswith("{"):
            if complete:
                end = raw.rstrip()
                return ParsedCall(name, end[:-1].rstrip() if end.endswith("}") else end)
            cut = raw.rfind("}")
            return ParsedCall(name, (raw[:cut] if cut >= 0 else raw).rstrip())
        if not complete:
            return ParsedCall(name, "")  # arguments written as a JSON string, or not begun: known once whole
    if not complete:
        return None
    try:
        obj = json.loads(body)
    except ValueError:  # broken JSON: a call once its header was read (a stream has sent it), else no call
        return ParsedCall(json.loads(header.group(1)), "") if header is not None else None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    return ParsedCall(obj["name"], arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                                          ensure_ascii=False))


def _call_schema(tools: Sequence[ToolSpec], arguments_key: str) -> str:
    """JSON schema text of one call of any of `tools`: `{"name": <const>, "<arguments_key>": <its parameters>}`."""
    calls = [{"type": "object", "properties": {"name": {"const": t.name}, arguments_key: close_objects(t.parameters)},
              "required": ["name", arguments_key], "additionalProperties": False} for t in tools]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return json.dumps({"x-guidance": _COMPACT_JSON, **schema}, ensure_ascii=False)


class HermesParser:
    name = "hermes"
    open, close = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> Parsed:
        start = text.find(self.open)
        if start < 0:
            return Parsed(text if final else text[: len(text) - _held(text, self.open)])
        content, calls = [text[:start]], []
        pos = start
        while pos >= 0:
            body_start = pos + len(self.open)
            end = text.find(self.close, body_start)
            if end < 0:  # the last call, still open (or cut short by the end of the answer)
                body = text[body_start:]
                call = _call(body[: len(body) - _held(body, self.close)], final)  # a cut-off closing tag: none
                if call is not None:
                    calls.append(call)
                elif final:
                    content.append(text[pos:])
                break
            call = _call(text[body_start:end], True)
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
        call = f'"{self.open}\\n" %json{_call_schema(tools, "arguments")} "\\n{self.close}"'
        calls = "call" if one else 'call ("\\n" call)*'
        start = f"start: TEXT | {calls}\nTEXT: /[^<](.|\\n)*/" if or_text else f"start: {calls}"
        return f"{start}\ncall: {call}\n"


class Llama3JsonParser:
    name = "llama3_json"
    python_tag = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> Parsed:
        pos = len(text) - len(text.lstrip())
        if text.startswith(self.python_tag, pos):
            pos += len(self.python_tag)
            pos += len(text[pos:]) - len(text[pos:].lstrip())
        if pos == len(text):
            return Parsed(text if final else "")
        if text[pos] != "{":
            return Parsed(text)
        decoder, calls = json.JSONDecoder(), []
        while pos < len(text):
            try:
                _, end = decoder.raw_decode(text, pos)
            except ValueError:  # an object still being written (or cut short)
                call = _call(text[pos:], final)
                if call is not None:
                    calls.append(call)
                elif final:
                    return Parsed(text[pos:] if calls else text, tuple(calls))
                break
            call = _call(text[pos:end], True)
            if call is None:  # JSON that is no call: the answer is content (once the first object shows it)
                return Parsed(text, ()) if not calls else Parsed(text[pos:] if final else "", tuple(calls))
            calls.append(call)
            pos = _SEPARATOR.match(text, end).end()  # type: ignore[union-attr]
            if pos < len(text) and text[pos] != "{":
                return Parsed(text[pos:] if final else "", tuple(calls))
        return Parsed("", tuple(calls))

    def grammar(self, tools: Sequence[ToolSpec], *, one: bool, or_text: bool) -> str:
        calls = "call" if one else 'call ("; " call)*'
        start = f"start: TEXT | {calls}\nTEXT: /[^{{](.|\\n)*/" if or_text else f"start: {calls}"
        return f"{start}\ncall: %json{_call_schema(tools, 'parameters')}\n"


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

    def __init__(self, parser: ToolParser, limit: int | None = None) -> None:
        self.parser, self.limit = parser, limit
        self.text = ""
        self.content_sent = 0
        self.ids: list[str] = []
        self.arguments_sent: list[int] = []

    def feed(self, text: str, final: bool = False) -> list[dict[str, Any]]:
        self.text += text
        parsed = self.parser.parse(self.text, final)
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
