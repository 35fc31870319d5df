"""Whisper's log-mel features in numpy: a mono waveform -> (n_mels, frames) as transformers' `WhisperFeatureExtractor`
computes them (same window, STFT, Slaney mel filters, log10 floor and scaling), within 1e-4.

Numpy on purpose, not torch: this runs in the preprocessing threads, and a parallel torch op there starts an OpenMP
team of its own beside the engine thread's; on two cores that halves the engine's speed (see model/qwen2_vision.py's
patches and server/state.py `in_fresh_thread`). numpy's FFT (pocketfft) is single-threaded, and the mel projection
below never reaches BLAS (whose thread pool would contend the same way): each filter is a short dot over the few
frequency bins it covers, done with einsum's own loops.

As Qwen2-Audio's processor asks (`padding="max_length"`), every clip is padded with silence to the window
(`chunk_length` seconds) and its valid frames counted: `frames = ceil(samples / hop_length)`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["AudioFeatureConfig", "FeatureExtractor", "mel_filter_bank"]


@dataclass(frozen=True)
class AudioFeatureConfig:
    """The fields of a `WhisperFeatureExtractor` preprocessor_config.json that change the features."""

    feature_size: int = 128  # mel bins (Whisper large-v3, Qwen2-Audio); 80 for older Whisper models
    sampling_rate: int = 16000
    hop_length: int = 160
    n_fft: int = 400
    chunk_length: int = 30  # seconds in one window
    n_samples: int = field(init=False)
    nb_max_frames: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_samples", self.chunk_length * self.sampling_rate)
        object.__setattr__(self, "nb_max_frames", self.n_samples // self.hop_length)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> AudioFeatureConfig:
        kind = d.get("feature_extractor_type", "WhisperFeatureExtractor")
        if kind != "WhisperFeatureExtractor":
            raise ValueError(f"feature extractor {kind!r} is not supported (WhisperFeatureExtractor only)")
        if d.get("dither", 0.0) or d.get("do_normalize", False):
            raise ValueError("dither and do_normalize are not supported in the Whisper feature extractor")
        return cls(feature_size=int(d.get("feature_size", 80)), sampling_rate=int(d.get("sampling_rate", 16000)),
                   hop_length=int(d.get("hop_length", 160)), n_fft=int(d.get("n_fft", 400)),
                   chunk_length=int(d.get("chunk_length", 30)))

    @classmethod
    def from_dir(cls, path: Path) -> AudioFeatureConfig:
        """From `preprocessor_config.json`, or the `feature_extractor` of transformers 5's `processor_config.json`."""
        file = path / "preprocessor_config.json"
        if file.is_file():
            return cls.from_hf(json.loads(file.read_text()))
        processor = path / "processor_config.json"
        nested = json.loads(processor.read_text()).get("feature_extractor") if processor.is_file() else None
        if not isinstance(nested, dict):
            raise ValueError(f"{path} has no feature extractor config (preprocessor_config.json) for its audio")
        return cls.from_hf(nested)


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, transformers' `mel_scale="slaney"`): linear below 1 kHz, log above."""
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(freq, 1e-10) / 1000.0) * (27.0 / math.log(6.4)), mels)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    freq = 200.0 * mels / 3.0
    return np.where(mels >= 15.0, 1000.0 * np.exp(math.log(6.4) / 27.0 * (mels - 15.0)), freq)


def mel_filter_bank(*, num_frequency_bins: int, num_mel_filters: int, sampling_rate: int,
                    min_frequency: float = 0.0, max_frequency: float = 8000.0) -> np.ndarray:
    """Triangular Slaney-normalised filters (num_frequency_bins, num_mel_filters), as transformers' `mel_filter_bank`
    with norm="slaney", mel_scale="slaney"."""
    fft_freqs = np.linspace(0, sampling_rate // 2, num_frequency_bins)  # (F,)
    mels = np.linspace(_hz_to_mel(np.array(min_frequency)), _hz_to_mel(np.array(max_frequency)), num_mel_filters + 2)
    filter_freqs = _mel_to_hz(mels)  # (M + 2,)
    diff = np.diff(filter_freqs)  # (M + 1,)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]  # (F, M + 2)
    down = -slopes[:, :-2] / diff[:-1]  # (F, M)
    up = slopes[:, 2:] / diff[1:]  # (F, M)
    filters = np.maximum(0.0, np.minimum(down, up))  # (F, M)
    enorm = 2.0 / (filter_freqs[2 : num_mel_filters + 2] - filter_freqs[:num_mel_filters])  # (M,)
    out: np.ndarray = filters * enorm[None, :]  # (F, M)
    return out


class FeatureExtractor:
    """Waveform -> Whisper log-mel features, one window per clip. Stateless after construction: thread-safe."""

    def __init__(self, config: AudioFeatureConfig) -> None:
        self.config = c = config
        filters = mel_filter_bank(num_frequency_bins=1 + c.n_fft // 2, num_mel_filters=c.feature_size,
                                  sampling_rate=c.sampling_rate)  # (F, M)
        # Each filter's support: its nonzero bins are one run [lo, hi); the projection sums over that run only.
        self._bands: list[tuple[int, int, np.ndarray]] = []
        for m in range(c.feature_size):
            nz = np.nonzero(filters[:, m])[0]
            lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
            self._bands.append((lo, hi, np.ascontiguousarray(filters[lo:hi, m])))
        n = np.arange(c.n_fft)
        self._window = 0.5 - 0.5 * np.cos(2 * np.pi * n / c.n_fft)  # periodic Hann, torch.hann_window's (N_fft,)

    def frames(self, num_samples: int) -> int:
        """Valid feature frames of a clip of `num_samples` samples (the feature attention mask's sum)."""
        return min(-(-num_samples // self.config.hop_length), self.config.nb_max_frames)

    def __call__(self, wave: np.ndarray) -> tuple[np.ndarray, int]:  # (N,) at config.sampling_rate
        """(features (n_mels, nb_max_frames) float32, valid frames): the clip padded with silence to the window."""
        c = self.config
        padded = np.zeros(c.n_samples, dtype=np.float64)  # (S,)
        n = min(len(wave), c.n_samples)
        padded[:n] = wave[:n]
        half = c.n_fft // 2
        signal = np.pad(padded, (half, half), mode="reflect")  # (S + N_fft,) torch.stft's center=True
        n_frames = 1 + (len(signal) - c.n_fft) // c.hop_length
        strided = np.lib.stride_tricks.as_strided(
            signal, shape=(n_frames, c.n_fft), strides=(signal.strides[0] * c.hop_length, signal.strides[0]),
            writeable=False)  # (T + 1, N_fft)
        spectrum = np.fft.rfft(strided * self._window, axis=-1)[:-1]  # (T, F) the last frame dropped, as Whisper
        power = np.ascontiguousarray((spectrum.real**2 + spectrum.imag**2).T)  # (F, T)
        mel = np.empty((c.feature_size, power.shape[1]), dtype=np.float64)  # (M, T)
        for m, (lo, hi, weights) in enumerate(self._bands):
            mel[m] = np.einsum("f,ft->t", weights, power[lo:hi])  # (T,) einsum's loops: no BLAS threads
        log_spec = np.log10(np.maximum(mel, 1e-10))  # (M, T)
        log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
        return ((log_spec + 4.0) / 4.0).astype(np.float32), self.frames(n)
