"""A request's output constraint: OpenAI's `response_format` or vLLM's `structured_outputs`, turned into one
llguidance grammar and compiled off the event loop within a time limit (a schema bomb gets a fast 400)."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from .engine.structured import grammar_from
from .errors import APIError
from .schemas import ChatCompletionRequest

if TYPE_CHECKING:
    from .engine.serving import ServingEngine

GRAMMAR_TIMEOUT_S = 2.0  # compiling one grammar (a cached one costs nothing)


def grammar_of(body: ChatCompletionRequest) -> tuple[str, str] | None:
    """(llguidance grammar, the field it came from), or None when the output is free text."""
    fmt, so = body.response_format, body.structured_outputs
    if fmt is not None and fmt.type != "text" and so is not None:
        raise APIError(400, "give response_format or structured_outputs, not both", param="structured_outputs",
                       code="invalid_value")
    try:
        if fmt is not None and fmt.type == "json_object":
            return grammar_from("json_schema", json.dumps({"type": "object"})), "response_format"
        if fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise APIError(400, "response_format json_schema needs its json_schema", param="response_format",
                               code="invalid_value")
            return grammar_from("json_schema", json.dumps(fmt.json_schema.schema_)), "response_format"
        if fmt is not None and fmt.json_schema is not None:
            raise APIError(400, f"response_format {fmt.type!r} takes no json_schema", param="response_format",
                           code="invalid_value")
        if so is None:
            return None
        values = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar}
        given = [k for k, v in values.items() if v is not None]
        if len(given) != 1:
            raise APIError(400, "structured_outputs takes exactly one of json, regex, choice, grammar",
                           param="structured_outputs", code="invalid_value")
        return _grammar(given[0], values[given[0]]), f"structured_outputs.{given[0]}"
    except APIError:
        raise
    except Exception as e:  # llguidance's parse errors
        raise APIError(400, f"the output constraint cannot be read: {str(e)[:300]}", param="response_format"
                       if fmt is not None else "structured_outputs", code="invalid_value") from e


def schema_grammar(text: str) -> str:
    """The grammar of a JSON schema given as text (/v1/generate's `json_schema` field)."""
    try:
        schema = json.loads(text)
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema is an object")
        return grammar_from("json_schema", json.dumps(schema))
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"json_schema: {str(e)[:300]}", param="json_schema", code="invalid_value") from e


def _grammar(kind: str, value: Any) -> str:
    if kind == "json":
        return grammar_from("json_schema", value if isinstance(value, str) else json.dumps(value))
    if kind == "regex":
        return grammar_from("regex", value)
    if kind == "choice":
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in value)  # Lark string literals
        return grammar_from("lark", f"start: {alternatives}")
    return grammar_from("lark", value)


async def compile_grammar(engine: ServingEngine, grammar: str, param: str) -> None:
    """Validate and compile the grammar in a worker thread: 400 naming `param` if it is unusable or too slow."""
    try:
        await asyncio.wait_for(asyncio.to_thread(engine.compile_grammar, grammar), GRAMMAR_TIMEOUT_S)
    except TimeoutError:
        raise APIError(400, f"the output constraint took over {GRAMMAR_TIMEOUT_S:.0f} s to compile",
                       param=param, code="invalid_value") from None
    except Exception as e:
        raise APIError(400, str(e), param=param, code="invalid_value") from e
