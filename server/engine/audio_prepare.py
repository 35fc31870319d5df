"""Turning audio bytes into what the engine encodes: decode (model/audio_decode.py, every cap checked), Whisper
features (model/audio_features.py), and the clip's audio-token count; plus the placing of images and clips in one
prompt-ordered list, as the engine reads them (server/engine/sequence.py `image_spans`).

Runs in the preprocessing pool, never on the event loop nor the engine thread: numpy, libsndfile and libsoxr only, so
no torch op starts an OpenMP team beside the engine's (`torch.from_numpy` wraps the features, it computes nothing).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from vlmserve.model.audio_config import AudioEncoderConfig
from vlmserve.model.audio_decode import AudioError, AudioLimits, decode_audio
from vlmserve.model.audio_features import AudioFeatureConfig, FeatureExtractor
from vlmserve.model.audio_weights import AUDIO_DIR
from vlmserve.model.prompt import EncodedPrompt

from .requests import ImageInput


def audio_hash(data: bytes) -> str:
    """Content key of a clip: the same bytes always give the same audio tokens."""
    return hashlib.blake2b(data, digest_size=20).hexdigest()


class AudioPreparer:
    """Decodes clips and computes their features for one model's audio tower. Stateless after construction."""

    def __init__(self, encoder: AudioEncoderConfig, features: AudioFeatureConfig, limits: AudioLimits) -> None:
        if features.feature_size != encoder.num_mel_bins:
            raise ValueError(f"the feature extractor makes {features.feature_size} mel bins; the audio encoder "
                             f"takes {encoder.num_mel_bins}")
        if features.nb_max_frames != encoder.num_frames:
            raise ValueError(f"the feature extractor's window is {features.nb_max_frames} frames; the audio encoder "
                             f"takes {encoder.num_frames}")
        self.encoder, self.extractor = encoder, FeatureExtractor(features)
        # One clip is one window: a clip longer than the window (or the setting) is refused, never cut.
        self.limits = AudioLimits(max_seconds=min(limits.max_seconds, float(features.chunk_length)),
                                  max_bytes=limits.max_bytes)
        self.processing = hashlib.blake2b(repr((features, encoder)).encode(), digest_size=8).hexdigest()

    @classmethod
    def for_checkpoint(cls, path: Path, encoder: AudioEncoderConfig, limits: AudioLimits) -> AudioPreparer:
        """The feature extractor of a qwen2_audio checkpoint, or of the `audio/` folder beside a VLM."""
        folder = path / AUDIO_DIR if (path / AUDIO_DIR / "config.json").is_file() else path
        return cls(encoder, AudioFeatureConfig.from_dir(folder), limits)

    def key(self, digest: str) -> str:
        """The content key of a clip with bytes hash `digest` (the prefix keeps it apart from any image key)."""
        return f"audio-{digest}-{self.processing}"

    def leased(self, digest: str, tokens: torch.Tensor | None) -> ImageInput | None:
        """A clip the engine already holds audio tokens for (Engine.lease_image): nothing to decode."""
        if tokens is None:
            return None
        return ImageInput(self.key(digest), None, tokens.shape[0], visual_tokens=tokens, audio_frames=0)

    def clip(self, data: bytes, fmt: str | None = None, digest: str | None = None) -> ImageInput:
        """Decode (caps checked from the header first, and while decoding) and featurize one clip. AudioError."""
        rate = self.extractor.config.sampling_rate
        wave = decode_audio(data, self.limits, rate, declared=fmt)  # (N,) mono at the extractor's rate
        features, frames = self.extractor(wave[: self.extractor.config.n_samples])  # (M, F), valid frames
        tokens = self.encoder.num_tokens(frames)
        if tokens < 1:
            raise AudioError(f"audio is too short ({len(wave) / rate * 1000:.0f} ms): it makes no audio token")
        return ImageInput(self.key(digest or audio_hash(data)), torch.from_numpy(features), tokens,
                          audio_frames=frames)


def in_prompt_order(encoded: EncodedPrompt, images: Sequence[ImageInput], audio: Sequence[ImageInput]
                    ) -> list[ImageInput]:
    """The request's images and clips as the prompt holds them: each list in its parts' order, interleaved by where
    their slots start."""
    if len(images) != len(encoded.image_spans) or len(audio) != len(encoded.audio_spans):
        raise ValueError(f"{len(images)} images and {len(audio)} clips for {len(encoded.image_spans)} image and "
                         f"{len(encoded.audio_spans)} audio spans")
    starts = [(s.start, img) for s, img in zip(encoded.image_spans, images, strict=True)]
    starts += [(s.start, clip) for s, clip in zip(encoded.audio_spans, audio, strict=True)]
    return [item for _, item in sorted(starts, key=lambda pair: pair[0])]
