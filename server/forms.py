"""The multipart form of `POST /v1/generate`: read within caps, each field typed, each mistake a 400 naming it,
and no field outside `GENERATE_FIELDS` accepted."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import Request
from starlette.datastructures import FormData, UploadFile

from vlmserve.model.sampling import SamplingParams

from .errors import APIError
from .schemas import sampling_params
from .settings import Settings

# The form fields of /v1/generate; any other is refused (a field silently ignored would be believed honoured)
GENERATE_FIELDS = frozenset({"model", "prompt", "image", "audio", "stop", "temperature", "top_p", "top_k", "seed",
                             "stream", "max_tokens", "cache_salt", "json_schema", "detail"})


async def read_form(request: Request, settings: Settings) -> FormData:
    """The multipart (or urlencoded) form of a /v1/generate request, within the settings' caps."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise APIError(400, "POST /v1/generate takes multipart/form-data (fields: image, prompt, ...)",
                       code="invalid_content_type")
    try:
        return await request.form(max_files=settings.max_images_per_request + settings.max_audios_per_request + 1,
                                  max_fields=64, max_part_size=settings.max_image_bytes)
    except Exception as e:
        raise APIError(400, f"malformed multipart body: {e}", code="invalid_form") from e


class Form:
    """Typed access to multipart fields, each mistake a 400 naming the field."""

    def __init__(self, form: FormData) -> None:
        self.form = form

    def to_sampling_params(self, defaults: Mapping[str, Any]) -> SamplingParams:
        """The form's sampling fields over the checkpoint's `defaults`."""
        return sampling_params(defaults, temperature=self.number("temperature", 0, 2),
                               top_p=self.number("top_p", 0, 1), top_k=self.integer("top_k", 0, 2**63 - 1),
                               seed=self.integer("seed", -(2**63), 2**63 - 1))

    def texts(self, name: str) -> list[str]:
        values = self.form.getlist(name)
        texts = [v for v in values if isinstance(v, str)]
        if len(texts) != len(values):
            raise APIError(400, f"form field {name!r} must be text, not a file", param=name)
        return texts

    def text(self, name: str) -> str | None:
        values = self.texts(name)
        if len(values) > 1:
            raise APIError(400, f"form field {name!r} given {len(values)} times", param=name)
        return values[0] if values else None

    def files(self, name: str) -> list[UploadFile]:
        values = self.form.getlist(name)
        files = [v for v in values if isinstance(v, UploadFile)]
        if len(files) != len(values):
            raise APIError(400, f"form field {name!r} must be a file upload", param=name)
        return files

    def number(self, name: str, lo: float, hi: float) -> float | None:
        raw = self.text(name)
        if raw is None or raw == "":
            return None
        try:
            value = float(raw)
        except ValueError:
            raise APIError(400, f"{name} must be a number, got {raw[:32]!r}", param=name) from None
        if not lo <= value <= hi or value != value:
            raise APIError(400, f"{name} must be between {lo} and {hi}", param=name)
        return value

    def integer(self, name: str, lo: int, hi: int | None = None) -> int | None:
        raw = self.text(name)
        if raw is None or raw == "":
            return None
        try:
            value = int(raw)
        except ValueError:
            raise APIError(400, f"{name} must be an integer, got {raw[:32]!r}", param=name) from None
        if value < lo or (hi is not None and value > hi):
            raise APIError(400, f"{name} must be >= {lo}" + (f" and <= {hi}" if hi is not None else ""), param=name)
        return value

    def boolean(self, name: str) -> bool:
        raw = self.text(name)
        if raw is None or raw == "":
            return False
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise APIError(400, f"{name} must be true or false, got {raw[:32]!r}", param=name)

