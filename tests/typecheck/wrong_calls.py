"""Deliberately wrong calls across the project's modules; never imported or run.

`mypy tests/typecheck/wrong_calls.py` must reject every line marked `# wrong:`, with that error code:
tests/test_typecheck.py checks it, so a configuration that stops resolving `vlmserve.*` imports (they would turn
into Any, and every call here would pass) fails the tests.
"""

from vlmserve.model.sampling import SamplingParams
from vlmserve.server.engine.requests import EngineRequest
from vlmserve.server.pipeline import choice_sampling
from vlmserve_client import Client


def server_to_model() -> None:
    choice_sampling(SamplingParams(), "1")  # wrong: arg-type (the choice index is an int)
    SamplingParams(temperture=0.5)  # wrong: call-arg (a misspelt field)


def server_to_engine() -> None:
    EngineRequest("req-1", "What is in the image?")  # wrong: arg-type (prompt ids, not text)


def to_the_client() -> None:
    Client(max_retries="3")  # wrong: arg-type (an int)
