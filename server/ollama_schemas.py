"""Ollama's request bodies (/api/chat, /api/generate, /api/show), field by field as its API documents them.

As on the OpenAI routes, nothing is accepted and ignored: a field or option that would change the answer and that
this server does not implement is refused with 400 naming it, unless its value asks for nothing; options that mean
nothing to a running server (`num_gpu`, `num_thread`, `num_batch`, `use_mmap`, ...; `keep_alive` on the body) are
accepted and documented as no-ops, since Ollama's own clients send them on every call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from vlmserve.model.sampling import SamplingParams

from .schemas import ChatTool, StopStrings, sampling_params

# Options that change nothing here (resource and loading knobs of a llama.cpp runner)
NO_OP_OPTIONS = frozenset({"num_gpu", "main_gpu", "num_thread", "num_batch", "numa", "low_vram", "f16_kv", "use_mmap",
                           "use_mlock", "vocab_only", "embedding_only", "logits_all", "num_keep", "num_ctx"})
# Options that would change the answer and are not implemented: the values that ask for nothing
UNSUPPORTED_OPTIONS: dict[str, tuple[object, ...]] = {
    "tfs_z": (1, 1.0), "typical_p": (1, 1.0), "min_p": (0, 0.0), "mirostat": (0,), "mirostat_tau": (5, 5.0),
    "mirostat_eta": (0.1,), "penalize_newline": (True,), "repeat_last_n": (-1,),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Options(_Strict):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, lt=2**63)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    num_predict: int | None = Field(None, ge=-2)  # -1: up to the context, -2: fill the context
    stop: StopStrings | None = None
    repeat_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # no-ops (NO_OP_OPTIONS)
    num_gpu: int | None = None
    main_gpu: int | None = None
    num_thread: int | None = None
    num_batch: int | None = None
    numa: bool | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    vocab_only: bool | None = None
    embedding_only: bool | None = None
    logits_all: bool | None = None
    num_keep: int | None = None
    num_ctx: int | None = Field(None, ge=1)  # checked against the context by the route
    # not implemented (UNSUPPORTED_OPTIONS)
    tfs_z: float | None = None
    typical_p: float | None = None
    min_p: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    penalize_newline: bool | None = None
    repeat_last_n: int | None = None

    def to_sampling_params(self, defaults: Mapping[str, Any]) -> SamplingParams:
        return sampling_params(defaults, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                               seed=self.seed, presence=self.presence_penalty, frequency=self.frequency_penalty,
                               repetition=self.repeat_penalty)

    @field_validator(*UNSUPPORTED_OPTIONS)
    @classmethod
    def _unsupported(cls, value: object, info: ValidationInfo) -> object:
        assert info.field_name is not None
        if value is None or value in UNSUPPORTED_OPTIONS[info.field_name]:
            return value
        raise PydanticCustomError("unsupported_parameter", f"option {info.field_name!r} is not supported here")


class _Request(_Strict):
    model: str = Field(min_length=1)
    stream: bool = True
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options | None = None
    keep_alive: float | str | None = None  # no-op: the model stays loaded for the server's life
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("think")
    @classmethod
    def _no_thinking(cls, value: object) -> object:
        if value not in (None, False):
            raise PydanticCustomError("unsupported_parameter", "this model does not think (think: false)")
        return value

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: object, info: ValidationInfo) -> object:
        if value not in (None, False, 0):
            raise PydanticCustomError("unsupported_parameter", f"{info.field_name} is not supported on /api/*")
        return value


class CalledFunction(_Strict):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: int | None = None  # annotation: the call's place in its answer


class ToolCall(_Strict):
    function: CalledFunction
    id: str | None = None  # annotation (Ollama's calls carry no ids; ours are made up)
    type: Literal["function"] | None = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None  # base64
    thinking: str | None = None  # annotation: an earlier answer's thinking
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)  # an assistant turn's calls
    tool_name: str | None = None  # a tool turn: the function whose result it is (the template's tool_call_id)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(default_factory=list)
    tools: list[ChatTool] | None = Field(None, max_length=128)


class GenerateRequest(_Request):
    prompt: str = ""
    system: str | None = None
    images: list[str] | None = None  # base64
    raw: bool | None = None
    template: str | None = None
    context: list[int] | None = None
    suffix: str | None = None

    @field_validator("raw", "template", "context", "suffix")
    @classmethod
    def _unsupported(cls, value: object, info: ValidationInfo) -> object:
        if value in (None, False, "", []):
            return value
        raise PydanticCustomError("unsupported_parameter", f"{info.field_name!r} is not supported here")


class ShowRequest(_Strict):
    model: str = Field(min_length=1)
    verbose: bool | None = None
