"""The audio steps of the serving pipeline: each clip's bytes (base64 of an `input_audio` part, or a `/v1/generate`
upload) within --max-audio-bytes, then decoded and featurized in the thread pool, or leased from the audio-token
cache by content hash (no decoding at all), each refusal a 4xx naming the part. A model without an audio tower
refuses audio parts; one without a vision tower refuses image parts (400 naming the part)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Sequence

from starlette.datastructures import UploadFile

from vlmserve.model.audio_decode import AudioError, container

from .engine import ImageInput
from .engine.audio_prepare import audio_hash
from .errors import APIError
from .inputs import AudioRef, ImageRef
from .state import ServerState


def check_audio_supported(state: ServerState, refs: Sequence[AudioRef]) -> None:
    """400 naming the first audio part when the model has no audio tower, or past --max-audios-per-request."""
    if refs and state.audio is None:
        raise APIError(400, f"this model has no audio tower: {refs[0].param} cannot be heard", param=refs[0].param,
                       code="unsupported_audio")
    limit = state.settings.max_audios_per_request
    if len(refs) > limit:
        raise APIError(400, f"{len(refs)} audio clips in one request; the limit is {limit}", param=refs[limit].param,
                       code="too_many_audio_clips")


def check_images_supported(state: ServerState, refs: Sequence[ImageRef]) -> None:
    """400 naming the first image part when the model has no vision tower (a qwen2_audio checkpoint)."""
    engine = state.engine
    if refs and engine is not None and engine.model.config.vision is None:
        raise APIError(400, f"this model has no vision tower: {refs[0].param} cannot be seen", param=refs[0].param,
                       code="unsupported_image")


def audio_bytes(ref: AudioRef, max_bytes: int) -> bytes:
    """The bytes of an `input_audio` part's base64 data; the size is checked before decoding (413)."""
    payload = ref.data.strip()
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise APIError(413, f"audio is over the limit of {max_bytes} bytes (--max-audio-bytes)", param=ref.param,
                       code="audio_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"input_audio data is not valid base64: {e}", param=f"{ref.param}.data",
                       code="invalid_audio") from e
    if not data:
        raise APIError(400, "input_audio data is empty", param=f"{ref.param}.data", code="invalid_audio")
    return data


async def upload_bytes(upload: UploadFile, max_bytes: int, param: str) -> bytes:
    """A `/v1/generate` audio upload's bytes, 413 past --max-audio-bytes (read no further than one byte past it)."""
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise APIError(413, f"audio is over the limit of {max_bytes} bytes (--max-audio-bytes)", param=param,
                       code="audio_too_large")
    if not data:
        raise APIError(400, "the audio upload is empty", param=param, code="invalid_audio")
    return data


async def prepare_audio(state: ServerState, clips: Sequence[tuple[bytes, str | None, str]], salt: str
                        ) -> list[ImageInput]:
    """Each (bytes, declared format or None, param) clip as the engine takes it, decoded in the thread pool; a
    clip whose audio tokens are cached is not decoded (the request leases the tokens)."""
    if not clips:
        return []
    audio, engine = state.audio, state.engine
    assert audio is not None and engine is not None  # check_audio_supported ran; the server is ready
    loop = asyncio.get_running_loop()

    def one(data: bytes, fmt: str | None, param: str) -> ImageInput:
        try:
            container(data, fmt)  # a clip must be what it says, cached or not
        except AudioError as e:
            raise APIError.from_exception(e, param=param) from e
        digest = audio_hash(data)
        leased = audio.leased(digest, engine.lease_image(audio.key(digest), salt))
        if leased is not None:
            state.metrics.audio_cache_hits.inc()
            return leased
        state.metrics.audio_cache_misses.inc()
        t0 = time.perf_counter()
        try:
            return audio.clip(data, fmt, digest)
        except Exception as e:
            raise APIError.from_exception(e, param=param) from e
        finally:
            state.metrics.audio_preprocess.observe(time.perf_counter() - t0)

    results = await asyncio.gather(*(loop.run_in_executor(state.executor, one, d, f, p) for d, f, p in clips),
                                   return_exceptions=True)
    error = next((r for r in results if isinstance(r, BaseException)), None)
    if error is not None:
        raise error
    return list(results)  # type: ignore[arg-type]
