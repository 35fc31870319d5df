"""Safe audio ingestion: untrusted bytes -> a mono float32 waveform at the model's sample rate, or an `AudioError`.

`decode_audio(data, limits)` accepts WAV, FLAC and MP3 only (sniffed from the content, then confirmed by libsndfile
through `soundfile`), reads rate, channels and length from the header and checks them against the caps before any
sample is decoded (a WAV whose header promises more than its body holds is refused: hours claimed are too long,
anything else truncated); MP3 has no reliable length in its header, so its samples are counted while they are
decoded, block by block, and decoding stops one sample past the duration cap (a small MP3 that expands to hours is
refused with no more than the cap decoded). Stereo and up to 8 channels are averaged to mono; clips at another rate are
resampled with soxr (libsoxr's VHQ polyphase filter, the reference resampler of SoX), so the features see the rate the
feature extractor was built for.

Everything here is numpy and libsndfile/libsoxr work meant for the preprocessing pool: no torch op runs, so no OpenMP
team is started beside the engine's (see model/audio_features.py). The functions keep no state.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np
import soundfile as sf
import soxr

logger = logging.getLogger(__name__)

__all__ = ["AUDIO_FORMATS", "AudioError", "AudioLimits", "audio_header", "container", "decode_audio"]

AUDIO_FORMATS = ("wav", "mp3", "flac")  # OpenAI's input_audio formats we decode (plus flac)
MAX_CHANNELS = 8
MIN_RATE, MAX_RATE = 8_000, 192_000  # sample rates we accept from a header
_BLOCK = 65_536  # frames decoded at a time while counting (MP3)

AudioErrorCode = Literal["invalid_audio", "unsupported_audio", "audio_too_large", "audio_too_long"]


class AudioError(ValueError):
    """Audio we refuse; `code` says why, `status_code` is the HTTP status it maps to (413 for bytes, else 400)."""

    def __init__(self, message: str, *, code: AudioErrorCode = "invalid_audio") -> None:
        super().__init__(message)
        self.code: AudioErrorCode = code

    @property
    def status_code(self) -> int:
        return 413 if self.code == "audio_too_large" else 400


@dataclass(frozen=True)
class AudioLimits:
    max_seconds: float = 30.0  # the Whisper window: one clip is one window of features
    max_bytes: int = 10 * 1024 * 1024


@dataclass(frozen=True)
class AudioHeader:
    format: str  # wav | flac | mp3
    samplerate: int
    channels: int
    frames: int | None  # None where the header does not say (MP3): counted while decoding


def sniff_format(data: bytes) -> str | None:
    """The container from the first bytes: RIFF/WAVE (and RF64), fLaC, or MPEG audio (an ID3 tag or a frame sync)."""
    if data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


def _wav_data_claim(data: bytes) -> tuple[int, int] | None:
    """(bytes the `data` chunk claims, bytes present) of a RIFF WAV, or None for RF64 or a streamed WAV (size 0 or
    0xFFFFFFFF: unknown). libsndfile trusts the bytes present and says nothing of a claim past them."""
    if data[:4] != b"RIFF":
        return None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if chunk == b"data":
            if size in (0, 0xFFFFFFFF):
                return None
            return size, len(data) - pos - 8
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    return None


def container(data: bytes, declared: str | None = None) -> str:
    """The clip's format from its first bytes (wav | flac | mp3), which must be the `declared` one where it is
    given; cheap (checked even for a clip whose tokens are cached). AudioError."""
    if not data:
        raise AudioError("audio data is empty")
    fmt = sniff_format(data)
    if fmt is None:
        raise AudioError("audio data is not WAV, FLAC or MP3", code="unsupported_audio")
    if declared is not None and declared != fmt:
        raise AudioError(f"audio declared as {declared!r} is {fmt}", code="invalid_audio")
    return fmt


def audio_header(data: bytes, limits: AudioLimits, declared: str | None = None) -> AudioHeader:
    """Format, rate, channels and (where the header has it) length, checked against `limits`. AudioError."""
    if len(data) > limits.max_bytes:
        raise AudioError(f"audio is {len(data)} bytes, over the limit of {limits.max_bytes}", code="audio_too_large")
    fmt = container(data, declared)
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        why = str(e).rsplit(": ", 1)[-1]  # libsndfile's reason, without the file object's repr
        raise AudioError(f"audio header cannot be read: {why}") from None
    rate, channels = int(info.samplerate), int(info.channels)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"audio sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE} Hz", code="unsupported_audio")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"audio has {channels} channels; at most {MAX_CHANNELS} are accepted",
                         code="unsupported_audio")
    frames = None if fmt == "mp3" else int(info.frames)
    claim = _wav_data_claim(data) if fmt == "wav" else None
    if claim is not None and claim[0] > claim[1]:  # the header promises more than the body holds
        block = max(1, channels * _sample_bytes(info.subtype))
        _check_duration(claim[0] // block, rate, limits)
        raise AudioError(f"audio is truncated: its header promises {claim[0]} bytes of samples, the data holds "
                         f"{claim[1]}")
    if frames is not None:
        _check_duration(frames, rate, limits)
        if frames == 0:
            raise AudioError("audio holds no samples")
    return AudioHeader(fmt, rate, channels, frames)


def _sample_bytes(subtype: str) -> int:
    """Bytes per sample of a WAV subtype (PCM_16, FLOAT, ...); 1 where it is not a whole number (ADPCM, ...)."""
    return {"PCM_U8": 1, "PCM_S8": 1, "ULAW": 1, "ALAW": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4,
            "DOUBLE": 8}.get(subtype, 1)


def _check_duration(frames: int, rate: int, limits: AudioLimits) -> None:
    if frames > limits.max_seconds * rate:
        raise AudioError(f"audio is {frames / rate:.1f} s long; the limit is {limits.max_seconds:g} s "
                         "(--max-audio-seconds)", code="audio_too_long")


def decode_audio(data: bytes, limits: AudioLimits, target_rate: int, declared: str | None = None) -> np.ndarray:
    """The clip as mono float32 samples in [-1, 1] at `target_rate`, (N,). AudioError on anything refused."""
    header = audio_header(data, limits, declared)
    cap = int(limits.max_seconds * header.samplerate)
    blocks: list[np.ndarray] = []
    total = 0
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            while True:
                block = f.read(min(_BLOCK, cap + 1 - total), dtype="float32", always_2d=True)  # (n, C)
                if not len(block):
                    break
                total += len(block)
                if total > cap:
                    raise AudioError(f"audio decodes to more than {limits.max_seconds:g} s (--max-audio-seconds)",
                                     code="audio_too_long")
                blocks.append(block.mean(axis=1, dtype=np.float32) if header.channels > 1 else block[:, 0])  # (n,)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(f"audio cannot be decoded: {str(e).rsplit(': ', 1)[-1]}") from None
    if header.frames is not None and total < header.frames:
        raise AudioError(f"audio is truncated: the header promises {header.frames} frames, the data holds {total}")
    if total == 0:
        raise AudioError("audio holds no samples")
    wave = np.concatenate(blocks)  # (N,)
    if not np.isfinite(wave).all():
        raise AudioError("audio holds non-finite samples")
    if header.samplerate != target_rate:
        wave = soxr.resample(wave, header.samplerate, target_rate, quality="VHQ").astype(np.float32)  # (N',)
    return wave
