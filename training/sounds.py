"""The training generator of the SOUNDS world (/work/shared/SOUNDS.md): clips of beeps, questions, dense labels.

Everything is deterministic from a seed. A clip is 1-3 non-overlapping sounds (a sine `tone` or a square `buzz`,
naive or band-limited, at 250 / 500 / 1000 Hz +-5 %, 10 ms linear fades) over silence or faint white noise, written
as 16-bit PCM WAV at 16, 22.05, 44.1 or 48 kHz, mono or stereo with identical channels. Training clips then go
through the serving path (model/audio_decode.py: libsndfile + soxr to the feature extractor's rate, then
model/audio_features.py's log-mel features), so the encoder trains on exactly what the server will give it.

Besides questions and captions, a clip yields dense labels for the audio encoder's pretraining, one per audio token
(40 ms): the (pitch, kind) of the sound covering most of it, its pitch, its kind, its rank in time order, and the
clip's sound count. This file shares no code with `training/eval_sounds.py`, the independent renderer of the eval.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from .world import draw_questions

PITCH_HZ: dict[str, float] = {"low": 250.0, "mid": 500.0, "high": 1000.0}
PITCHES: tuple[str, ...] = tuple(PITCH_HZ)
SOUND_KINDS: tuple[str, ...] = ("tone", "buzz")
SOUND_PAIRS: tuple[tuple[str, str], ...] = tuple((p, k) for p in PITCHES for k in SOUND_KINDS)
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three")
QUESTION_KINDS: tuple[str, ...] = ("count", "pitch", "kind", "exists", "caption")
RATES: tuple[int, ...] = (16000, 22050, 44100, 48000)

SECONDS = (1.0, 3.0)
SOUND_SECONDS = (0.15, 0.40)
MIN_GAP, MARGIN = 0.10, 0.05
PITCH_JITTER = 0.05
AMPLITUDE = (0.2, 0.8)
FADE = 0.010
NOISE_PEAK = 0.02
TOKEN_SECONDS = 0.04  # one audio token: 4 mel hops of 10 ms (stride-2 conv, then pooling by 2)


@dataclass(frozen=True)
class Sound:
    """One beep: names, onset and length in seconds, the drawn frequency and peak, and how a buzz is made."""

    pitch: str
    kind: str
    start: float
    length: float
    freq: float
    peak: float
    band_limited: bool

    @property
    def end(self) -> float:
        return self.start + self.length


@dataclass(frozen=True)
class Clip:
    """A clip: its sounds in time order, length, sample rate, noise peak (0 = silence) and channel count."""

    sounds: tuple[Sound, ...]
    seconds: float
    rate: int
    noise: float
    channels: int

    def with_kind(self, kind: str) -> list[Sound]:
        return [s for s in self.sounds if s.kind == kind]

    def with_pitch(self, pitch: str) -> list[Sound]:
        return [s for s in self.sounds if s.pitch == pitch]


def random_clip(rng: random.Random, n_sounds: int | None = None) -> Clip:
    """A clip that obeys every number of SOUNDS.md; `n_sounds` 1-3 (default: uniform)."""
    n = n_sounds if n_sounds is not None else rng.randint(1, 3)
    seconds = round(rng.uniform(*SECONDS), 3)
    lengths = [rng.uniform(*SOUND_SECONDS) for _ in range(n)]
    slack = seconds - sum(lengths) - MIN_GAP * (n - 1) - 2 * MARGIN
    while slack < 0.0:  # a short clip with long sounds: shrink them until they fit
        lengths = [max(SOUND_SECONDS[0], x * 0.9) for x in lengths]
        slack = seconds - sum(lengths) - MIN_GAP * (n - 1) - 2 * MARGIN
    weights = [rng.random() + 1e-3 for _ in range(n + 1)]  # the slack spread over lead, gaps and tail
    spread = [slack * w / sum(weights) for w in weights]
    pairs = rng.sample(SOUND_PAIRS, n)
    sounds, t = [], MARGIN + spread[0]
    for i, ((pitch, kind), length) in enumerate(zip(pairs, lengths, strict=True)):
        freq = PITCH_HZ[pitch] * (1 + rng.uniform(-PITCH_JITTER, PITCH_JITTER))
        sounds.append(Sound(pitch, kind, round(t, 4), round(length, 4), freq, rng.uniform(*AMPLITUDE),
                            rng.random() < 0.5))
        t += length + MIN_GAP + spread[i + 1]
    noise = 0.0 if rng.random() < 0.5 else rng.uniform(0.002, NOISE_PEAK)
    return Clip(tuple(sounds), seconds, rng.choice(RATES), noise, 1 if rng.random() < 0.7 else 2)


def _waveform(sound: Sound, rate: int, phase: float) -> np.ndarray:
    """The sound's samples (n,) at `rate`, peak `sound.peak`, with linear fades."""
    n = round(sound.length * rate)
    t = np.arange(n) / rate  # (n,)
    arg = 2 * np.pi * sound.freq * t + phase  # (n,)
    if sound.kind == "tone":
        wave = np.sin(arg)
    elif sound.band_limited:  # odd harmonics below Nyquist, scaled back to a unit peak
        wave = np.zeros(n)
        for h in range(1, int(rate / 2 / sound.freq) + 1, 2):
            wave += np.sin(h * arg) / h
        wave /= np.abs(wave).max()
    else:
        wave = np.where(np.sin(arg) >= 0, 1.0, -1.0)
    ramp = min(round(FADE * rate), n // 2)
    envelope = np.ones(n)
    fade = np.arange(ramp) / ramp  # (ramp,) 0 -> 1
    envelope[:ramp] = fade
    envelope[n - ramp :] = fade[::-1]
    return sound.peak * wave * envelope  # (n,)


def synthesize(clip: Clip, rng: random.Random) -> np.ndarray:
    """The clip's mono samples (N,) in [-1, 1] at `clip.rate`."""
    total = round(clip.seconds * clip.rate)
    out = np.zeros(total)  # (N,)
    if clip.noise:
        gen = np.random.default_rng(rng.getrandbits(32))
        out += gen.uniform(-clip.noise, clip.noise, total)
    for s in clip.sounds:
        wave = _waveform(s, clip.rate, rng.uniform(0, 2 * np.pi))
        a = round(s.start * clip.rate)
        out[a : a + len(wave)] += wave[: total - a]
    return np.clip(out, -1.0, 1.0)


def wav_bytes(clip: Clip, rng: random.Random) -> bytes:
    """The clip as 16-bit PCM WAV bytes (channels identical when stereo)."""
    mono = synthesize(clip, rng)  # (N,)
    data = np.repeat(mono[:, None], clip.channels, axis=1)  # (N, C)
    buf = io.BytesIO()
    sf.write(buf, data.astype(np.float32), clip.rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ questions


def describe(sound: Sound) -> str:
    return f"a {sound.pitch} {sound.kind}"


def caption(clip: Clip) -> str:
    """`a low tone`, `a low tone and a high buzz`, `a low tone, a high buzz and a mid tone`."""
    parts = [describe(s) for s in clip.sounds]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def question_for(clip: Clip, kind: str, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of `kind` about `clip`, or None when SOUNDS.md does not ask it of this clip."""
    if kind == "count":
        return "How many sounds are there?", NUMBER_WORDS[len(clip.sounds) - 1]
    if kind == "pitch":
        kinds = [k for k in SOUND_KINDS if len(clip.with_kind(k)) == 1]
        if not kinds:
            return None
        k = rng.choice(kinds)
        return f"What pitch is the {k}?", clip.with_kind(k)[0].pitch
    if kind == "kind":
        pitches = [p for p in PITCHES if len(clip.with_pitch(p)) == 1]
        if not pitches:
            return None
        p = rng.choice(pitches)
        return f"What kind of sound is the {p} one?", clip.with_pitch(p)[0].kind
    if kind == "exists":
        present = {(s.pitch, s.kind) for s in clip.sounds}
        pool = sorted(present) if rng.random() < 0.5 else [q for q in SOUND_PAIRS if q not in present]
        p, k = rng.choice(pool)
        return f"Is there a {p} {k}?", "yes" if (p, k) in present else "no"
    if kind == "caption":
        return "Describe the sound.", caption(clip)
    raise ValueError(f"unknown question kind {kind!r}")


def sample_questions(clips: Sequence[Clip], rng: random.Random, weights: dict[str, float]
                     ) -> list[tuple[int, str, str, str]]:
    """One (clip index, kind, question, answer) per clip, kinds drawn with `weights` among those askable."""
    return draw_questions(clips, rng, weights, question_for)


# ------------------------------------------------------------------------------------------------ dense labels

# (name, classes) of each per-token target, in the order of `token_labels`' channels.
TARGETS: tuple[tuple[str, int], ...] = (
    ("pair", len(SOUND_PAIRS) + 1),
    ("pitch", len(PITCHES) + 1),
    ("kind", len(SOUND_KINDS) + 1),
    ("rank", 4),
    ("count", 3),
)


def token_labels(clip: Clip, n_tokens: int, valid: int) -> np.ndarray:
    """(5, n_tokens) int64: per audio token the pair, pitch, kind (0 = no sound covers half of it), time rank
    (1-3; 0 = none) and the clip's count - 1; tokens past `valid` (the window's padding) are -100."""
    labels = np.zeros((5, n_tokens), dtype=np.int64)
    starts = np.arange(n_tokens) * TOKEN_SECONDS  # (T,)
    for rank, s in enumerate(clip.sounds, start=1):
        cover = np.clip(np.minimum(starts + TOKEN_SECONDS, s.end) - np.maximum(starts, s.start), 0, None)  # (T,)
        hit = cover >= TOKEN_SECONDS / 2
        labels[0, hit] = SOUND_PAIRS.index((s.pitch, s.kind)) + 1
        labels[1, hit] = PITCHES.index(s.pitch) + 1
        labels[2, hit] = SOUND_KINDS.index(s.kind) + 1
        labels[3, hit] = rank
    labels[4] = len(clip.sounds) - 1
    labels[:, valid:] = -100
    return labels
