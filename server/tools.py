"""A chat request's tools: checked against `tool_choice` and the chat template, shown to the model through the
template, forced by a grammar when the request asks for a call, and read back out of the answer by the parser.

- `tool_choice` "none" (or no tools): the model is shown no tools and its answer is all content.
- "auto" (the default with tools): the model may call; the parser reads calls out of its answer. If any function is
  `strict`, the answer is constrained to either content or valid calls.
- "required" / a named function: the answer is one or more calls (exactly one of the named function), valid by
  construction against the functions' parameter schemas.
- `parallel_tool_calls: false`: at most one call (a forced choice is constrained to one; in auto, calls after the
  first are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmserve.model.messages import clean_strings
from vlmserve.model.tokenizer import ChatTokenizer

from .engine.structured import grammar_from
from .errors import APIError
from .schemas import CalledFunction, ChatCompletionRequest, ChatTool, NamedToolChoice, ResponseMessage, ToolCall
from .tool_parsers import PARSERS, ToolCallStream, ToolParser, ToolSpec, new_call_id


@dataclass(frozen=True)
class ToolUse:
    tools: list[dict[str, Any]]  # as the chat template gets them
    parser: ToolParser
    grammar: str | None  # llguidance grammar when the answer is constrained
    limit: int | None  # calls kept (None: all)
    named: bool = False  # tool_choice named the function: the answer "stop"s, as OpenAI's does
    names: frozenset[str] | None = None  # the functions offered: a "call" of any other stays content

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.parser, self.limit, self.names)

    def message(self, text: str) -> ResponseMessage:
        """A whole answer as an assistant message: its content (None when it is only calls) and its calls."""
        parsed = self.parser.parse(text, final=True, names=self.names)
        calls = [ToolCall(id=new_call_id(), function=CalledFunction(name=c.name, arguments=c.arguments))
                 for c in parsed.calls[: self.limit]]
        return ResponseMessage(content=parsed.content if parsed.content or not calls else None,
                               tool_calls=calls or None)


def tool_use(body: ChatCompletionRequest, tokenizer: ChatTokenizer, parser_name: str) -> ToolUse | None:
    """The chat request's tool use, or None when the model is shown no tools (`tool_use_of`)."""
    return tool_use_of(body.tools or [], body.tool_choice, body.parallel_tool_calls, tokenizer, parser_name)


def tool_use_of(tools: list[ChatTool], choice: str | NamedToolChoice | None, parallel: bool | None,
                tokenizer: ChatTokenizer, parser_name: str) -> ToolUse | None:
    """The tool use of these tools and choice, or None when the model is shown no tools. 400 naming the field when
    the tools, the choice and the template do not fit together."""
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
        return None
    if choice == "none":
        return None
    if not tokenizer.renders_tools:
        raise APIError(400, "this model's chat template does not render tools, so the model cannot be shown them "
                       "(serve it with a --chat-template that does)", param="tools", code="unsupported_parameter")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: two functions share a name", param="tools", code="invalid_value")
    specs = [ToolSpec(t.function.name, t.function.parameters or {"type": "object", "properties": {}}) for t in tools]
    parser = PARSERS[parser_name]
    one = parallel is False
    try:
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                               param="tool_choice", code="invalid_value")
            lark = parser.grammar([s for s in specs if s.name == choice.function.name], one=True, or_text=False)
        elif choice == "required":
            lark = parser.grammar(specs, one=one, or_text=False)
        elif any(t.function.strict for t in tools):
            lark = parser.grammar(specs, one=one, or_text=True)
        else:
            lark = None
        grammar = grammar_from("lark", lark) if lark is not None else None
    except APIError:
        raise
    except Exception as e:  # llguidance cannot read a parameters schema
        raise APIError(400, f"a function's parameters cannot be used: {str(e)[:300]}", param="tools",
                       code="invalid_value") from e
    shown = [clean_strings(t.model_dump(exclude_none=True)) for t in tools]  # lone surrogates: U+FFFD
    return ToolUse(shown, parser, grammar, 1 if one else None, named=isinstance(choice, NamedToolChoice),
                   names=frozenset(names))
