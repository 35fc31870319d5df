"""Structured outputs: grammar-constrained decoding through llguidance (the library vLLM and SGLang use).

A request carries its grammar as llguidance's serialized form (plain text: requests stay serializable). The API
compiles it once, off the event loop and off the model thread (`compile`), which also validates it against the
vocabulary and keeps a ready matcher as a template, cached by the grammar's text. Each sequence gets a copy of the
template; at each step the runner turns the constrained sequences' matchers into one token bitmask and masks their
logits in one call before sampling, then feeds every sampled token back to its matcher. A finished grammar allows
only EOS, so a constrained answer ends as any other.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from vlmserve.model.tokenizer import ChatTokenizer

from .requests import BadRequest

if TYPE_CHECKING:
    from llguidance import LLMatcher, LLTokenizer

TEMPLATES = 256  # compiled grammars kept (LRU)
_LITERALS = ("const", "enum", "default", "examples")  # values, not schemas
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_COMBINED = ("allOf", "not", "if", "then", "else", "dependentSchemas")  # subschemas whose keys others complete


def close_objects(schema: Any, *, close: bool = True) -> Any:
    """`schema` with every object that lists its properties closed (`additionalProperties: false`) unless it says
    otherwise, as xgrammar's strict mode (vLLM's default) reads schemas: an open object lets a model add keys
    without end, and the answer never finishes. Schemas combined with others (`allOf` branches and the object that
    holds them, `not`, `if` / `then` / `else`, `dependentSchemas`) stay as they are: closing one would forbid the
    keys the others add."""
    if isinstance(schema, list):
        return [close_objects(s, close=close) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        inner = close and key not in _COMBINED
        if key in _LITERALS:
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):  # name -> schema: the names are no keywords
            out[key] = {name: close_objects(sub, close=inner) for name, sub in value.items()}
        else:
            out[key] = close_objects(value, close=inner)
    if close and "properties" in out and not {"additionalProperties", "patternProperties", "allOf"} & out.keys():
        out["additionalProperties"] = False
    return out


def json_schema_grammar(schema: str | dict[str, Any]) -> str:
    """llguidance's grammar for a JSON schema (text or object): compact JSON, no whitespace freedom and no
    unlisted keys to wander off with (`close_objects`)."""
    import llguidance

    value = json.loads(schema) if isinstance(schema, str) else schema
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(close_objects(value)),
                                                         defaults={"whitespace_flexible": False})


def grammar_from(kind: str, text: str) -> str:
    """llguidance's grammar from a regex (`regex`), a Lark grammar (`lark`) or JSON-schema text (`json_schema`)."""
    import llguidance

    if kind == "json_schema":
        return json_schema_grammar(text)
    return llguidance.grammar_from(kind, text)  # type: ignore[arg-type]


class StructuredOutputs:
    """Compiles grammars for one tokenizer and masks a batch's logits by their matchers."""

    def __init__(self, tokenizer: ChatTokenizer, vocab_size: int) -> None:
        self.hf_tokenizer, self.vocab_size = tokenizer.tokenizer, vocab_size
        self.eos_ids = list(tokenizer.eos_token_ids)
        self._tokenizer: LLTokenizer | None = None  # llguidance's view of the vocabulary, built on first use
        self._templates: OrderedDict[str, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._mask: torch.Tensor | None = None  # (R, ceil(V / 32)) int32 bitmask, grown on demand

    def _ll_tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf
                from transformers import PreTrainedTokenizerFast

                if not isinstance(self.hf_tokenizer, PreTrainedTokenizerFast):  # llguidance's own check, typed
                    raise ValueError("Only fast tokenizers are supported")
                eos = self.eos_ids[0] if self.eos_ids else None
                self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                                               eos_token=eos)
            return self._tokenizer

    def compile(self, grammar: str) -> None:
        """Validate and compile `grammar` (BadRequest naming the problem), keeping a matcher template. Blocking:
        call it from a worker thread."""
        import llguidance

        with self._lock:
            if grammar in self._templates:
                self._templates.move_to_end(grammar)
                return
        tokenizer = self._ll_tokenizer()
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise BadRequest(f"the output grammar cannot be used: {error[:300]}")
        template = llguidance.LLMatcher(tokenizer, grammar)
        if template.is_error():
            raise BadRequest(f"the output grammar cannot be used: {template.get_error()[:300]}")
        with self._lock:
            self._templates[grammar] = template
            while len(self._templates) > TEMPLATES:
                self._templates.popitem(last=False)

    def matcher(self, grammar: str) -> LLMatcher:
        """A fresh matcher for one sequence (compiling the grammar if no template is cached)."""
        with self._lock:
            template = self._templates.get(grammar)
        if template is None:
            self.compile(grammar)
            with self._lock:
                template = self._templates[grammar]
        return template.deep_copy()

    def mask(self, logits: torch.Tensor, matchers: Sequence[LLMatcher | None]) -> torch.Tensor:
        """Logits (B, V) with every token its row's matcher forbids at -inf (rows with no matcher: unchanged)."""
        import llguidance.torch as llt

        present = [(i, m) for i, m in enumerate(matchers) if m is not None]
        rows = [i for i, _ in present]
        if self._mask is None or self._mask.shape[0] < len(rows):
            self._mask = llt.allocate_token_bitmask(max(len(rows), 8), self.vocab_size)
        mask = self._mask[: len(rows)]
        for j, (_, matcher) in enumerate(present):
            llt.fill_next_token_bitmask(matcher, mask, j)
        sub = logits[rows].float()  # (S, V)
        llt.apply_token_bitmask_inplace(sub, mask.to(sub.device, non_blocking=True))
        out = logits.to(torch.float32, copy=True)  # (B, V): one copy, whatever the dtype
        out[rows] = sub
        return out  # (B, V)
