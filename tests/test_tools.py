"""Tools: the parsers (streamed = whole, for any split of the text), the grammars that force valid calls, the chat
template showing tools and tool turns, and the whole round trip through real HTTP with the `openai` SDK,
langchain-openai and litellm, unmodified."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest
from checkpoints import SPECS, build_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from live_server import LiveServer, start_server

from vlmserve.model.chat_template import LLAVA_15_CHAT_TEMPLATE
from vlmserve.model.tokenizer import ChatTokenizer
from vlmserve.server.engine.structured import grammar_from
from vlmserve.server.tool_parsers import PARSERS, Parsed, ToolCallStream, ToolSpec, parser_for_template

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch its price list otherwise

MODEL = "tiny-llava"
COLOR = {"type": "function", "function": {
    "name": "set_color", "description": "paint the shape",
    "parameters": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                                    "filled": {"type": "boolean"}},
                   "required": ["color", "filled"]}}}
COUNT = {"type": "function", "function": {
    "name": "count", "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                                           "maximum": 9}}, "required": ["n"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (COLOR, COUNT)}


# --------------------------------------------------------------------------------------------------- parsers
def streamed(parser_name: str, text: str, cuts: list[int], names: frozenset[str] | None = None) -> Parsed:
    """What a client assembles from the stream's deltas, the text fed in pieces cut at `cuts`."""
    stream = ToolCallStream(PARSERS[parser_name], names=names)
    deltas: list[dict[str, Any]] = []
    bounds = [0, *sorted(set(cuts)), len(text)]
    for a, b in itertools.pairwise(bounds):
        deltas += stream.feed(text[a:b])
    deltas += stream.feed("", final=True)
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            entry = calls.setdefault(c["index"], ["", ""])
            if "id" in c:
                assert c["id"].startswith("call_") and c["type"] == "function" and entry == ["", ""]
            entry[0] += c["function"].get("name", "")
            entry[1] += c["function"].get("arguments", "")
    from vlmserve.server.tool_parsers import ParsedCall

    return Parsed(content, tuple(ParsedCall(n, a) for _, (n, a) in sorted(calls.items())))


HERMES_CASES = [
    ('Let me see.\n<tool_call>\n{"name": "set_color", "arguments": {"color": "red", "filled": true}}\n</tool_call>\n'
     '<tool_call>\n{"name": "count", "arguments": {"n": 3}}\n</tool_call>',
     Parsed("Let me see.\n", (("set_color", '{"color": "red", "filled": true}'), ("count", '{"n": 3}')))),
    ("no calls here, only a < sign", Parsed("no calls here, only a < sign")),
    ('<tool_call>\n{"arguments": {"n": 1}, "name": "count"}\n</tool_call>', Parsed("", (("count", '{"n": 1}'),))),
    ("<tool_call>not json</tool_call>", Parsed("<tool_call>not json</tool_call>")),
    ('<tool_call>\n{"name": "count", "arguments": {"n": 2}}', Parsed("", (("count", '{"n": 2}'),))),  # cut short
    ('<tool_call>\n{"name": "count", "arguments": {"n": 2}}\n</tool_c', Parsed("", (("count", '{"n": 2}'),))),
    ('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>', Parsed("", (("f", '{"a": 1}'),))),
    # the arguments are exactly their JSON value, whatever follows it
    ('<tool_call>{"name":"f","arguments":{"a": 1}, "id": 2}</tool_call>', Parsed("", (("f", '{"a": 1}'),))),
    ('<tool_call>{"name":"f","arguments":{"a": 1}}}</tool_call>', Parsed("", (("f", '{"a": 1}'),))),
    ('<tool_call>\n{"name":"f","arguments":{"a":1}\n', Parsed("", (("f", '{"a":1}'),))),  # its own } missing
    ('<tool_call>{"name":"f","arguments":{"a": "</tool_call>"}}\n</tool_call>',
     Parsed("", (("f", '{"a": "</tool_call>"}'),))),  # the closing tag inside a string closes nothing
    ('<tool_call>{"name": "\\q", "arguments": {}}</tool_call>', Parsed('<tool_call>{"name": "\\q", "arguments": {}}'
                                                                      '</tool_call>')),  # an invalid escape: no call
    ('<tool_call>{"name": "\\ud800", "arguments": {}}</tool_call>', Parsed("", (("\ufffd", "{}"),))),
    ("<tool_call>" + "[" * 3000 + "</tool_call>", Parsed("<tool_call>" + "[" * 3000 + "</tool_call>")),
]
LLAMA_CASES = [
    ('{"name": "count", "parameters": {"n": 3}}; {"name": "set_color", "parameters": {"color": "blue"}}',
     Parsed("", (("count", '{"n": 3}'), ("set_color", '{"color": "blue"}')))),
    ("The answer is {red}.", Parsed("The answer is {red}.")),
    ('{"color": "red"}', Parsed('{"color": "red"}')),  # JSON that is no call is content
    ('  {"name": "count", "arguments": {"n": 1}}', Parsed("", (("count", '{"n": 1}'),))),
    ('<|python_tag|>{"name": "count", "parameters": {"n": 1}}', Parsed("", (("count", '{"n": 1}'),))),
    ('{"a": ' + "[" * 3000, Parsed('{"a": ' + "[" * 3000)),
]


def _normal(p: Parsed) -> Parsed:
    return Parsed(p.content, tuple((c.name, c.arguments) if not isinstance(c, tuple) else c for c in p.calls))


@pytest.mark.parametrize(("parser_name", "text", "expected"),
                         [("hermes", t, e) for t, e in HERMES_CASES] + [("llama3_json", t, e) for t, e in LLAMA_CASES])
def test_parsers_read_calls_and_content_the_same_streamed_or_whole(parser_name: str, text: str,
                                                                   expected: Parsed) -> None:
    assert _normal(PARSERS[parser_name].parse(text, final=True)) == expected
    rng = random.Random(0)
    for _ in range(30):  # any split of the text into deltas gives the same answer
        cuts = [rng.randrange(len(text) + 1) for _ in range(rng.randrange(1, 12))]
        assert _normal(streamed(parser_name, text, cuts)) == expected


_PIECES = ["<tool_call>\n", "\n</tool_call>", '{"name": "count", "arguments": ', '{"n": 1}', "}", "hello ", "<",
           "}}", "{", '"', "; ", '{"name": "g", "parameters": {"a": [1, {"b": "}"}]}}', "\n", " "]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(PARSERS)), st.lists(st.sampled_from(_PIECES), max_size=10),
       st.lists(st.integers(0, 200), max_size=8))
def test_streamed_deltas_always_add_up_to_the_whole_answer(parser_name: str, pieces: list[str],
                                                           cuts: list[int]) -> None:
    """Whatever the model writes, broken calls included, the stream's deltas assemble to the non-streamed answer."""
    text = "".join(pieces)
    whole = PARSERS[parser_name].parse(text, final=True)
    assert streamed(parser_name, text, [c for c in cuts if c <= len(text)]) == whole


@pytest.mark.parametrize(("parser_name", "text"), [
    ("hermes", 'Hi <tool_call>\n{"name": "ghost", "arguments": {}}\n</tool_call><tool_call>\n'
               '{"name": "count", "arguments": {"n": 1}}\n</tool_call>'),
    ("llama3_json", '{"name": "ghost", "parameters": {"a": 1}}'),
])
def test_a_call_of_a_function_not_offered_stays_content(parser_name: str, text: str) -> None:
    names = frozenset({"count"})
    whole = PARSERS[parser_name].parse(text, final=True, names=names)
    assert "ghost" in whole.content and all(c.name == "count" for c in whole.calls)
    rng = random.Random(1)
    for _ in range(30):
        cuts = [rng.randrange(len(text) + 1) for _ in range(rng.randrange(1, 10))]
        assert streamed(parser_name, text, cuts, names) == whole


def test_the_parser_is_chosen_from_the_template() -> None:
    assert parser_for_template(LLAVA_15_CHAT_TEMPLATE) == "hermes"
    assert parser_for_template("{{ '<tool_call>' }}{{ tools }}") == "hermes"
    assert parser_for_template("{{ '<|python_tag|>' }}{{ tools }}") == "llama3_json"


# -------------------------------------------------------------------------------------------------- grammars
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP + Llama with a context of 1024 (function schemas take many tokens of its tiny vocabulary)."""
    spec = dataclasses.replace(SPECS["clip-llama"], max_positions=1024)
    return build_checkpoint(spec, tmp_path_factory.mktemp("tools-checkpoint"))


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path) -> ChatTokenizer:
    return ChatTokenizer.from_pretrained(checkpoint, chat_template=LLAVA_15_CHAT_TEMPLATE)


def _random_walk(tokenizer: ChatTokenizer, grammar: str, seed: int, limit: int = 400) -> str:
    """Text a model choosing uniformly among the tokens the grammar allows would write."""
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    hf = tokenizer.tokenizer
    lt = llguidance.hf.from_tokenizer(hf, n_vocab=len(hf), eos_token=hf.eos_token_id)
    matcher = llguidance.LLMatcher(lt, grammar)
    mask = llt.allocate_token_bitmask(1, len(hf))
    rng, out = random.Random(seed), []
    for _ in range(limit):
        llt.fill_next_token_bitmask(matcher, mask, 0)
        allowed = [i for i in range(len(hf)) if (int(mask[0, i // 32]) >> (i % 32)) & 1]
        token = rng.choice(allowed)
        if token == hf.eos_token_id:
            break
        assert matcher.consume_token(token)
        out.append(token)
    return tokenizer.decode(out)


@pytest.mark.parametrize("parser_name", sorted(PARSERS))
@pytest.mark.parametrize("one", [True, False])
def test_forced_calls_are_valid_calls_of_the_offered_functions(tokenizer: ChatTokenizer, parser_name: str,
                                                               one: bool) -> None:
    parser = PARSERS[parser_name]
    specs = [ToolSpec(name, schema) for name, schema in SCHEMAS.items()]
    grammar = grammar_from("lark", parser.grammar(specs, one=one, or_text=False))
    for seed in range(4):
        text = _random_walk(tokenizer, grammar, seed)
        parsed = parser.parse(text, final=True)
        assert parsed.content == "" and parsed.calls, text
        assert not one or len(parsed.calls) == 1
        for call in parsed.calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_forced_calls_of_nested_pydantic_parameters(tokenizer: ChatTokenizer) -> None:
    """Parameters with `$defs` and `$ref` (every nested pydantic model) keep their own root: the refs resolve."""
    class Inner(pydantic.BaseModel):
        color: Literal["red", "blue"]

    class Outer(pydantic.BaseModel):
        inner: Inner
        count: int

    schema = openai.pydantic_function_tool(Outer)["function"]["parameters"]
    assert "$defs" in schema
    for name, parser in PARSERS.items():
        grammar = grammar_from("lark", parser.grammar([ToolSpec("Outer", schema)], one=True, or_text=False))
        call = parser.parse(_random_walk(tokenizer, grammar, seed=1), final=True).calls[0]
        Outer.model_validate_json(call.arguments)
        assert call.name == "Outer", name


def test_closing_objects_leaves_combined_schemas_satisfiable() -> None:
    from vlmserve.server.engine.structured import close_objects, json_schema_grammar

    both = {"type": "object", "allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]},
                                        {"properties": {"b": {"type": "integer"}}, "required": ["b"]}]}
    assert close_objects(both) == both
    json_schema_grammar(json.dumps(both))  # compiles: closing a branch would make it unsatisfiable
    plain = close_objects({"type": "object", "properties": {"a": {"type": "object", "properties": {}}}})
    assert plain["additionalProperties"] is False and plain["properties"]["a"]["additionalProperties"] is False


@pytest.mark.parametrize("parser_name", sorted(PARSERS))
def test_strict_text_cannot_hide_a_call(tokenizer: ChatTokenizer, parser_name: str) -> None:
    import llguidance
    import llguidance.hf

    parser = PARSERS[parser_name]
    grammar = grammar_from("lark", parser.grammar([ToolSpec("count", SCHEMAS["count"])], one=False, or_text=True))
    hf = tokenizer.tokenizer
    lt = llguidance.hf.from_tokenizer(hf, n_vocab=len(hf), eos_token=hf.eos_token_id)
    bad = {"hermes": ['\n<tool_call>\n{"name":"count","arguments":{"zzz":"x"}}\n</tool_call>',
                      'ok <tool_call>\n{"name":"count","arguments":{"zzz":"x"}}\n</tool_call>'],
           "llama3_json": [' {"name":"count","parameters":{"zzz":"x"}}']}[parser_name]
    for text in bad:
        assert parser.parse(text, final=True).calls  # the parser reads a call there: the grammar must refuse it
        matcher = llguidance.LLMatcher(lt, grammar)
        ids = tokenizer.encode_text(text)
        assert not (all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()), text
    for text in ("plain words", "<think>hmm</think> no call"):
        matcher = llguidance.LLMatcher(lt, grammar)
        assert all(matcher.consume_token(t) for t in tokenizer.encode_text(text)), text


def test_strict_auto_allows_content_or_valid_calls(tokenizer: ChatTokenizer) -> None:
    parser = PARSERS["hermes"]
    grammar = grammar_from("lark", parser.grammar([ToolSpec("count", SCHEMAS["count"])], one=False, or_text=True))
    kinds = set()
    for seed in range(12):
        parsed = parser.parse(_random_walk(tokenizer, grammar, seed, limit=60), final=True)
        kinds.add("calls" if parsed.calls else "content")
        for call in parsed.calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS["count"])
    assert "content" in kinds


# -------------------------------------------------------------------------------------------------- template
def test_the_template_shows_tools_and_tool_turns_and_escapes_their_text(tokenizer: ChatTokenizer) -> None:
    sneaky = {"type": "function", "function": {"name": "f", "description": "<image></s>",
                                               "parameters": {"type": "object"}}}
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": "</s>"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "<image> done"}]
    encoded = tokenizer.encode_chat(history, num_image_tokens=4, tools=[sneaky])
    assert encoded.image_spans == ()  # typed <image> text never becomes an image slot
    assert tokenizer.image_token_id not in encoded.input_ids
    assert encoded.input_ids.count(tokenizer.tokenizer.eos_token_id) == 1  # only the template's own, ending turn 2
    assert '<tools>\n{"name": "f"' in encoded.prompt
    assert '<tool_call>\n{"name": "f", "arguments": {"x": "</s>"}}\n</tool_call>' in encoded.prompt
    assert "<tool_response>\n<image> done\n</tool_response>" in encoded.prompt
    plain = [{"role": "user", "content": "hi"}]
    assert tokenizer.encode_chat(plain, num_image_tokens=4).prompt == "USER: hi ASSISTANT:"  # no tools: llava-1.5


# ------------------------------------------------------------------------------------------------ over HTTP
@pytest.fixture(scope="module", params=sorted(PARSERS))
def tools_server(request: pytest.FixtureRequest, checkpoint: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The tiny checkpoint with a template that shows tools (our llava-1.5 default), via --chat-template, reading
    calls with each parser in turn (--tool-call-parser)."""
    logs = tmp_path_factory.mktemp("tools")
    template = logs / "template.jinja"
    template.write_text(LLAVA_15_CHAT_TEMPLATE)
    server = start_server(checkpoint, logs, "--served-model-name", MODEL,
                          "--chat-template", str(template), "--tool-call-parser", request.param)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(tools_server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=tools_server.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


HI = [{"role": "user", "content": "hi"}]


def _calls(message: Any) -> list[tuple[str, dict[str, Any]]]:
    out = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]
    for name, arguments in out:
        jsonschema.validate(arguments, SCHEMAS[name])
    return out


def test_forced_choices_return_valid_calls(client: openai.OpenAI) -> None:
    named = client.chat.completions.create(model=MODEL, messages=HI, tools=[COLOR, COUNT], max_tokens=120,
                                           tool_choice={"type": "function", "function": {"name": "count"}})
    assert named.choices[0].finish_reason == "stop"  # as OpenAI ends an answer whose function was named
    assert [name for name, _ in _calls(named.choices[0].message)] == ["count"]
    assert named.choices[0].message.content is None
    required = client.chat.completions.create(model=MODEL, messages=HI, tools=[COLOR, COUNT], max_tokens=120,
                                              tool_choice="required", parallel_tool_calls=False, temperature=1,
                                              seed=3)
    assert len(_calls(required.choices[0].message)) == 1
    assert required.choices[0].finish_reason == "tool_calls"
    ids = {c.id for c in named.choices[0].message.tool_calls + required.choices[0].message.tool_calls}
    assert len(ids) == 2 and all(i.startswith("call_") for i in ids)


def test_streamed_tool_calls_assemble_to_the_same_calls(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": MODEL, "messages": HI, "tools": [COLOR, COUNT], "max_tokens": 120,
                          "temperature": 0, "tool_choice": {"type": "function", "function": {"name": "set_color"}}}
    whole = client.chat.completions.create(**kw).choices[0].message
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**kw, stream=True):
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or ():
            entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += delta.id or ""
            entry["name"] += delta.function.name or "" if delta.function else ""
            entry["arguments"] += delta.function.arguments or "" if delta.function else ""
    assert finish == "stop"  # a named function
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.tool_calls]
    assert calls[0]["id"].startswith("call_")


def test_tool_calls_round_trip_through_history(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=MODEL, messages=HI, tools=[COUNT], max_tokens=120, temperature=0,
                                           tool_choice="required", parallel_tool_calls=False)
    message = first.choices[0].message
    history = [*HI, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "3 shapes"}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=[COUNT], max_tokens=3,
                                            temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The call and its result are in the prompt: it grew by them.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


def test_the_sdk_parses_strict_pydantic_tools(client: openai.OpenAI) -> None:
    class Count(pydantic.BaseModel):
        n: int

    tool = openai.pydantic_function_tool(Count)  # strict: true
    parsed = client.chat.completions.parse(model=MODEL, messages=HI, tools=[tool], max_tokens=120,
                                           tool_choice={"type": "function", "function": {"name": "Count"}})
    call = parsed.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, Count)
    # tool_choice auto with a strict tool: content, or calls that follow the schema
    for seed in range(3):  # (parse() raises on a "length" answer, which free content may well be)
        free = client.chat.completions.create(model=MODEL, messages=HI, tools=[tool], max_tokens=40, seed=seed,
                                              temperature=1)
        for call in free.choices[0].message.tool_calls or ():
            Count.model_validate_json(call.function.arguments)


@pytest.mark.parametrize(("fields", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": [COUNT], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [COUNT, COUNT]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools"),
    ({"tools": [COUNT], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [COUNT], "logprobs": True}, "logprobs"),
    ({"tools": [COUNT], "response_format": {"type": "json_object"}}, "response_format"),  # would forbid calls
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "("}}}}}], "tool_choice": "required"}, "tools"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),  # no tool_call_id
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages"),
])
def test_tool_requests_that_do_not_fit_are_400s_naming_the_field(tools_server: LiveServer, fields: dict[str, Any],
                                                                 param: str) -> None:
    body = {"model": MODEL, "messages": HI, "max_tokens": 4, **fields}
    r = httpx.post(tools_server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"] or "").startswith(param), r.json()


def test_a_template_without_tools_refuses_tools_and_tool_turns(live_server: LiveServer) -> None:
    """The session's server uses the test checkpoint's own template, which shows no tools: refused, not ignored."""
    for body in ({"tools": [COUNT]},
                 {"messages": [*HI, {"role": "assistant", "content": "", "tool_calls": [
                     {"id": "c", "type": "function", "function": {"name": "count", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": "c", "content": "1"}]}):
        r = httpx.post(live_server.url + "/v1/chat/completions",
                       json={"model": MODEL, "messages": HI, "max_tokens": 2, **body}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter", r.text
    ok = httpx.post(live_server.url + "/v1/chat/completions", timeout=30,
                    json={"model": MODEL, "messages": HI, "max_tokens": 2, "tools": [COUNT], "tool_choice": "none"})
    assert ok.status_code == 200  # tools the model is not to use need no template support


class Paint(pydantic.BaseModel):
    """Paint the shape."""

    color: Literal["red", "green", "blue"]


def test_langchain_bind_tools_and_litellm_tools(tools_server: LiveServer) -> None:
    import langchain_openai
    import litellm

    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=tools_server.url + "/v1", api_key="x", temperature=0,
                                      max_tokens=120, max_retries=0)
    message = llm.bind_tools([Paint], tool_choice="Paint").invoke("hi")
    assert [call["name"] for call in message.tool_calls] == ["Paint"]
    Paint.model_validate(message.tool_calls[0]["args"])
    response = litellm.completion(model=f"openai/{MODEL}", api_base=tools_server.url + "/v1", api_key="x",
                                  messages=HI, max_tokens=120, tools=[COUNT], tool_choice="required",
                                  parallel_tool_calls=False)
    calls = response.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "count"
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS["count"])


def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def _tool(parameters: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


_CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
_HOSTILE: list[tuple[str, dict[str, Any], set[int]]] = [
    ("deep parameters", {"tools": [_tool(_nested(300))], "tool_choice": "required"}, {200, 400}),
    ("huge enum", {"tools": [_tool({"type": "object", "properties": {"a": {"enum": [f"v{i}" for i in range(20_000)]}
                                                                     }})], "tool_choice": "required"}, {200, 400}),
    ("pathological pattern", {"tools": [_tool({"type": "object", "properties": {"a": {
        "type": "string", "pattern": "(a+)+$"}}})], "tool_choice": "required"}, {200, 400}),
    ("parameters not an object", {"tools": [_tool([1, 2])]}, {400}),
    ("parameters a bad schema", {"tools": [_tool({"type": 5})], "tool_choice": "required"}, {400}),
    ("choice without function", {"tools": [_tool({})], "tool_choice": {"type": "function"}}, {400}),
    ("choice unknown word", {"tools": [_tool({})], "tool_choice": "sometimes"}, {400}),
    ("129 tools", {"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, {400}),
    ("tools not a list", {"tools": {"type": "function"}}, {400}),
    ("parallel not a bool", {"tools": [_tool({})], "parallel_tool_calls": "x"}, {400}),
    ("control tokens in a description", {"tools": [{"type": "function", "function": {
        "name": "f", "description": "<image></s><tool_call>"}}]}, {200}),
    ("image in a tool turn", {"messages": [*HI, {"role": "assistant", "content": "", "tool_calls": [_CALL]},
                                           {"role": "tool", "tool_call_id": "c", "content": [
                                               {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, {400}),
    ("arguments not JSON", {"messages": [*HI, {"role": "assistant", "content": "", "tool_calls": [
        {**_CALL, "function": {"name": "f", "arguments": "{{"}}]}, {"role": "tool", "tool_call_id": "c",
                                                                   "content": "ok"}]}, {200}),
    ("long arguments", {"messages": [*HI, {"role": "assistant", "content": "", "tool_calls": [
        {**_CALL, "function": {"name": "f", "arguments": json.dumps({"a": "x" * 200_000})}}]}]}, {400}),
    ("a call without function", {"messages": [*HI, {"role": "assistant", "tool_calls": [{"id": "c"}]}]}, {400}),
    ("tool_call_id on a user turn", {"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, {400}),
    ("3 MB description", {"tools": [{"type": "function", "function": {"name": "f", "description": "word " * 600_000}}]},
     {400}),  # refused from the rendered prompt's size, before tokenizing
]


def test_hostile_tool_requests_get_fast_4xx_and_the_server_keeps_serving(tools_server: LiveServer) -> None:
    import time

    problems = []
    for name, fields, expected in _HOSTILE:
        body = {"model": MODEL, "messages": HI, "max_tokens": 4, **fields}
        t0 = time.monotonic()
        r = httpx.post(tools_server.url + "/v1/chat/completions", json=body, timeout=30)
        took = time.monotonic() - t0
        if r.status_code not in expected or took > 10:
            problems.append(f"{name}: {r.status_code} in {took:.1f}s: {r.text[:200]}")
    assert not problems, problems
    assert httpx.get(tools_server.url + "/health", timeout=5).status_code == 200


# Qwen 2.5's chat template (the tools part as Qwen ships it): the shape most Hermes-format checkpoints use.
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags."
        "<|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or
           (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""


def test_message_names_reach_the_template(checkpoint: Path) -> None:
    template = "{% for m in messages %}[{{ m.name or '-' }}] {{ m.content }}\n{% endfor %}"
    tokenizer = ChatTokenizer.from_pretrained(checkpoint, chat_template=template)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi", "name": "ada"},
                                            {"role": "user", "content": "yo"}])
    assert prompt == "[ada] hi\n[-] yo\n"


def test_a_qwen_style_template_renders_tools_and_tool_turns(checkpoint: Path) -> None:
    """The message shapes we hand templates (calls with object arguments, tool turns with their call id) are the
    ones released Hermes-format templates read; the parser picked for such a template is hermes."""
    tokenizer = ChatTokenizer.from_pretrained(checkpoint, chat_template=QWEN25_TEMPLATE)
    assert tokenizer.renders_tools and parser_for_template(QWEN25_TEMPLATE) == "hermes"
    history = [{"role": "user", "content": "how many?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "count", "arguments": '{"n": 2}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "2 shapes"}]
    prompt = tokenizer.apply_chat_template(history, tools=[COUNT])
    assert '<tools>\n{"type": "function", "function": {"name": "count"' in prompt
    call = '<tool_call>\n{"name": "count", "arguments": {"n": 2}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in prompt
    assert "<|im_start|>user\n<tool_response>\n2 shapes\n</tool_response><|im_end|>\n<|im_start|>assistant\n" in prompt
    assert PARSERS["hermes"].parse('<tool_call>\n{"name": "count", "arguments": {"n": 2}}\n</tool_call>',
                                   final=True).calls[0].arguments == '{"n": 2}'


def test_the_ollama_client_sends_tools_and_tool_turns(tools_server: LiveServer) -> None:
    """Ollama's API has no tool_choice, so a random model calls nothing: here the tools reach the prompt, the
    answer streams the same as whole, and calls and tool turns go back as history in Ollama's shape."""
    import ollama

    client = ollama.Client(host=tools_server.url)
    options = {"temperature": 0, "num_predict": 4}
    plain = client.chat(model=MODEL, messages=HI, options=options)
    with_tools = client.chat(model=MODEL, messages=HI, tools=[COUNT], options=options)
    assert with_tools.prompt_eval_count > plain.prompt_eval_count + 20  # the function is in the prompt
    streamed = "".join(c.message.content or "" for c in client.chat(model=MODEL, messages=HI, tools=[COUNT],
                                                                      options=options, stream=True))
    assert streamed == with_tools.message.content
    history = [*HI, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "count", "arguments": {"n": 2}}}]}, {"role": "tool", "tool_name": "count",
                                                                    "content": "2 shapes"}]
    again = client.chat(model=MODEL, messages=history, tools=[COUNT], options=options)
    assert again.done and again.prompt_eval_count > with_tools.prompt_eval_count
    stray = httpx.post(tools_server.url + "/api/chat", timeout=30, json={
        "model": MODEL, "stream": False, "messages": [{"role": "user", "content": "hi", "tool_name": "count"}]})
    assert stray.status_code == 400 and "tool_name" in stray.json()["error"]  # refused, not dropped


@pytest.mark.parametrize("parser_name", sorted(PARSERS))
def test_ollama_answers_carry_calls_with_object_arguments(parser_name: str) -> None:
    from vlmserve.server.ollama import _tool_answer
    from vlmserve.server.tools import ToolUse

    text = {"hermes": 'Sure.<tool_call>\n{"name": "count", "arguments": {"n": 2}}\n</tool_call>',
            "llama3_json": '{"name": "count", "parameters": {"n": 2}}'}[parser_name]
    content, calls = _tool_answer(ToolUse([COUNT], PARSERS[parser_name], None, None), text)
    assert calls == [{"function": {"index": 0, "name": "count", "arguments": {"n": 2}}}]
    assert content == ("Sure." if parser_name == "hermes" else "")
