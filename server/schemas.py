"""Request and response bodies. OpenAI's chat completion shapes field by field; our extras are marked as such.

Streamed chunks are built as plain dicts in `api._chat_sse` (a pydantic model per token costs more than the
token's JSON); the non-streamed bodies below are models."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from vlmserve.model.messages import MAX_NESTING, nesting_depth
from vlmserve.model.sampling import SamplingParams

if TYPE_CHECKING:
    from pydantic.config import JsonDict

EXTRA: JsonDict = {"x-vlmserve-extra": True}  # marks fields OpenAI's API does not have
MAX_STOP_CHARS = 1024  # one stop string's length (the stop matcher holds back up to this much text)


def _as_list(value: object) -> object:
    return [] if value is None else [value] if isinstance(value, str) else value


def _check_stops(value: list[str]) -> list[str]:
    if any(not s for s in value):
        raise ValueError("stop strings must not be empty")
    if any(len(s) > MAX_STOP_CHARS for s in value):
        raise ValueError(f"stop strings are at most {MAX_STOP_CHARS} characters")
    return value


# A request's stop strings, as every route takes them: a string or a list, none empty, none over MAX_STOP_CHARS
StopStrings = Annotated[list[str], BeforeValidator(_as_list), AfterValidator(_check_stops)]


def sampling_params(defaults: Mapping[str, Any], *, temperature: float | None = None, top_p: float | None = None,
                    top_k: int | None = None, seed: int | None = None, presence: float | None = None,
                    frequency: float | None = None, repetition: float | None = None,
                    logit_bias: tuple[tuple[int, float], ...] = ()) -> SamplingParams:
    """A request's sampling: its values, else the checkpoint's `defaults` (generation_config.json), else OpenAI's.
    ValueError when the values do not fit together."""
    return SamplingParams(
        temperature=temperature if temperature is not None else defaults.get("temperature", 1.0),
        top_p=top_p if top_p is not None else defaults.get("top_p", 1.0),
        top_k=top_k if top_k is not None else defaults.get("top_k", 0),
        seed=seed,
        presence_penalty=presence or 0.0,
        frequency_penalty=frequency or 0.0,
        repetition_penalty=repetition if repetition is not None else defaults.get("repetition_penalty", 1.0),
        logit_bias=logit_bias,
    )


class _Strict(BaseModel):
    """A field outside OpenAI's API and our documented extras is refused (400 `unknown_parameter`), as OpenAI
    refuses it: a field silently ignored makes a client believe it was honoured."""

    model_config = ConfigDict(extra="forbid")


def _refuse_unless_neutral(name: str, value: object, neutral: tuple[object, ...]) -> object:
    """A field of OpenAI's API that we do not implement: accepted only with a value that asks for nothing."""
    if value in neutral:
        return value
    raise PydanticCustomError("unsupported_parameter", f"{name!r} is not supported by this server")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(max_length=64 * 1024**2)
    detail: Literal["auto", "low", "high"] | None = None  # the image's resolution setting (see the README per family)
    max_image_tokens: int | None = Field(None, ge=1, json_schema_extra=EXTRA,
                                         description="the most visual tokens this image may become")


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Strict):
    data: str = Field(max_length=64 * 1024**2)  # base64 of the file's bytes; the byte cap is --max-audio-bytes
    format: Literal["wav", "mp3", "flac"]


class AudioPart(_Strict):
    """OpenAI's `input_audio` content part."""

    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class CalledFunction(_Strict):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_Strict):
    """A call an assistant turn made (in a response, or sent back as history)."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers
    # What an assistant message of a response carries, so that a client may send one back as history as it got it.
    refusal: str | None = None  # annotation: the refusal text of an earlier answer
    annotations: list[Any] | None = None  # annotation (URL citations of an earlier answer)
    audio: Any = None  # must be null: no audio answers here
    function_call: Any = None  # must be null (the deprecated form of tool_calls)

    @field_validator("audio", "function_call")
    @classmethod
    def _unsupported(cls, value: object, info: ValidationInfo) -> object:
        return _refuse_unless_neutral(f"messages[].{info.field_name}", value, (None, []))

    @model_validator(mode="after")
    def _tool_turns(self) -> Message:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs tool_call_id, and only a tool message has one")
        return self


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: the function takes no arguments
    strict: bool | None = None  # true: calls follow the schema exactly (constrained, with tool_choice auto too)

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and nesting_depth(value) > MAX_NESTING:
            raise ValueError(f"parameters nest deeper than {MAX_NESTING} levels")
        return value


class ChatTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(max_length=64)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the output always follows the schema here, strict or not
    description: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(_Strict):
    """vLLM's `structured_outputs` extra: exactly one of these constrains the output."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")  # a JSON schema (object or text)
    regex: str | None = Field(None, max_length=10_000)
    choice: list[str] | None = Field(None, min_length=1, max_length=1024)
    grammar: str | None = Field(None, max_length=100_000)  # Lark, as llguidance reads it


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # annotation: no obfuscation padding is sent either way


# Fields of OpenAI's chat request that this server does not implement, each with the values that ask for nothing
# (sent by clients that fill every field); any other value is a 400 `unsupported_parameter` naming the field.
UNSUPPORTED_CHAT_FIELDS: dict[str, tuple[object, ...]] = {
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
}


class ChatCompletionRequest(_Strict):
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopStrings = Field(default_factory=list, description="a string or a list of strings")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    modalities: list[Literal["text", "audio"]] | None = None  # only ["text"]: there is no audio output
    # Annotations: accepted, logged where useful, and they change nothing in the answer.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None  # only false: nothing is stored
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # prefix caching here is automatic (and salted by `cache_salt`)
    tools: list[ChatTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call per answer
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: the k likeliest tokens too")
    logit_bias: dict[str, float] | None = Field(
        None, max_length=1024, description="token id (as a string) -> bias in [-100, 100] added to its logit"
    )
    # OpenAI fields not implemented (UNSUPPORTED_CHAT_FIELDS): refused unless neutral
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    # Our extras (vLLM's names)
    top_k: int | None = Field(None, ge=0, lt=2**63, json_schema_extra=EXTRA)
    repetition_penalty: float | None = Field(None, gt=0, le=10, json_schema_extra=EXTRA)
    ignore_eos: bool = Field(False, description="keep generating past EOS (benchmarks)", json_schema_extra=EXTRA)
    cache_salt: str | None = Field(
        None, max_length=256, json_schema_extra=EXTRA,
        description="requests share cached prompt prefixes and visual tokens only with the same salt (vLLM's field)",
    )
    structured_outputs: StructuredOutputsParams | None = Field(None, json_schema_extra=EXTRA)

    def to_sampling_params(self, defaults: Mapping[str, Any], logit_bias: tuple[tuple[int, float], ...] = ()
                           ) -> SamplingParams:
        """This request's sampling over the checkpoint's `defaults` (`logit_bias` as checked token id pairs)."""
        return sampling_params(defaults, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                               seed=self.seed, presence=self.presence_penalty, frequency=self.frequency_penalty,
                               repetition=self.repetition_penalty, logit_bias=logit_bias)

    @field_validator(*UNSUPPORTED_CHAT_FIELDS)
    @classmethod
    def _unsupported(cls, value: object, info: ValidationInfo) -> object:
        assert info.field_name is not None
        return _refuse_unless_neutral(info.field_name, value, UNSUPPORTED_CHAT_FIELDS[info.field_name])

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isascii() or not token.isdigit():
                raise ValueError(f"keys are token ids, got {token[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are in [-100, 100], got {bias} for token {token}")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        if value and "audio" in value:
            raise PydanticCustomError("unsupported_value", "only text output is supported (modalities: ['text'])")
        return value

    @field_validator("store")
    @classmethod
    def _stores_nothing(cls, value: bool | None) -> bool | None:
        if value:
            raise PydanticCustomError("unsupported_value", "this server stores no completions (store: false)")
        return value


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    image_tokens: int = Field(0, json_schema_extra=EXTRA)  # prompt tokens that are images' visual tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class GenerateResponse(BaseModel):
    """Answer of the native multipart endpoint `POST /v1/generate` (ours)."""

    id: str
    model: str
    text: str
    finish_reason: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlmserve"
    max_model_len: int | None = Field(None, json_schema_extra=EXTRA)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
