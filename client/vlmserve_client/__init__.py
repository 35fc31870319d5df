"""Python client of the vlmserve vision-language server (httpx + pydantic only).

    from vlmserve_client import Client

    with Client("http://127.0.0.1:8000") as client:
        answer = client.chat("What color is the circle?", images=["circle.png"], temperature=0)
        print(answer.text, answer.finish_reason, answer.usage)
"""

from ._async import AsyncClient, AsyncStream
from ._base import data_url, sniff_mime, user_message
from ._sync import Client, Stream
from .errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    VlmserveError,
)
from .types import Completion, ImageInput, Usage

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "Completion",
    "ImageInput",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitError",
    "ServerError",
    "ServiceUnavailableError",
    "Stream",
    "Usage",
    "VlmserveError",
    "__version__",
    "data_url",
    "sniff_mime",
    "user_message",
]
