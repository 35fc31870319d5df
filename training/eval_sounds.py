"""An independent renderer of the SOUNDS world (docs: /work/shared/SOUNDS.md), used only for evaluation.

It follows the spec alone and shares no code with the training renderer: clips are synthesised with numpy and
written with Python's stdlib `wave` module (16-bit PCM, mono or stereo with identical channels, 16000 / 22050 /
44100 / 48000 Hz), every placement is counted in whole samples (so the spec's margins hold exactly), and each buzz
is a naive square wave or a band-limited one (odd harmonics below Nyquist), chosen at random per sound.
"""

from __future__ import annotations

import io
import logging
import math
import wave
from collections import Counter
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

PITCHES: dict[str, float] = {"low": 250.0, "mid": 500.0, "high": 1000.0}
SOUND_KINDS: tuple[str, ...] = ("tone", "buzz")
KINDS: tuple[str, ...] = ("count", "pitch", "kind", "exists", "caption")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
RATES: tuple[int, ...] = (16000, 22050, 44100, 48000)

MIN_SECONDS, MAX_SECONDS = 1.0, 3.0
MAX_NOISE_PEAK = 0.02
MIN_SOUND_S, MAX_SOUND_S = 0.15, 0.40
MIN_GAP_S = 0.10
EDGE_S = 0.05
MAX_DETUNE = 0.05
MIN_AMPLITUDE, MAX_AMPLITUDE = 0.2, 0.8
FADE_S = 0.010
FULL_SCALE = 32767


@dataclass(frozen=True)
class Sound:
    """One sound: its names, its exact frequency and peak amplitude, where it lies (in samples), and how a buzz is
    synthesised (`band_limited`; False for a naive square; unused by a tone)."""

    pitch: str
    kind: str
    frequency: float
    amplitude: float
    start: int
    length: int
    band_limited: bool
    phase: float

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class Clip:
    """A clip of `frames` samples at `rate` Hz on `channels` identical channels, its background noise peak (0 for
    silence) and its 1-3 sounds in time order."""

    rate: int
    channels: int
    frames: int
    noise_peak: float
    sounds: tuple[Sound, ...]

    @property
    def seconds(self) -> float:
        return self.frames / self.rate


@dataclass(frozen=True)
class SoundItem:
    """One evaluation question about one clip (WAV bytes)."""

    audio: bytes
    format: str
    question: str
    answer: str
    kind: str


# --------------------------------------------------------------------------------------------------- clips


def _samples(seconds: float, rate: int, up: bool) -> int:
    """`seconds` as a whole number of samples, rounded up (a minimum) or down (a maximum), float noise aside."""
    exact = seconds * rate
    return math.ceil(exact - 1e-9) if up else math.floor(exact + 1e-9)


def sample_clip(rng: np.random.Generator, n_sounds: int | None = None) -> Clip:
    """Draw a random clip obeying every SOUNDS constraint (rate, duration, background, count, pairs, timing)."""
    rate = RATES[int(rng.integers(len(RATES)))]
    channels = 1 if rng.random() < 0.5 else 2
    k = int(rng.integers(1, 4)) if n_sounds is None else n_sounds
    if not 1 <= k <= 3:
        raise ValueError(f"a clip holds 1 to 3 sounds, not {k}")
    frames = int(rng.integers(_samples(MIN_SECONDS, rate, True), _samples(MAX_SECONDS, rate, False) + 1))
    edge, gap = _samples(EDGE_S, rate, True), _samples(MIN_GAP_S, rate, True)
    shortest, longest = _samples(MIN_SOUND_S, rate, True), _samples(MAX_SOUND_S, rate, False)
    while True:
        lengths = rng.integers(shortest, longest + 1, size=k)  # (k,)
        slack = frames - 2 * edge - (k - 1) * gap - int(lengths.sum())
        if slack >= 0:
            break
    # The slack goes to the k + 1 spaces (before, between, after), split uniformly over the simplex.
    cuts = np.sort(rng.integers(0, slack + 1, size=k))  # (k,)
    extra = np.diff(np.concatenate([[0], cuts, [slack]]))  # (k + 1,)
    pairs = [(p, s) for p in PITCHES for s in SOUND_KINDS]
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=k, replace=False)]
    sounds: list[Sound] = []
    cursor = edge
    for i, (pitch, kind) in enumerate(chosen):
        cursor += int(extra[i]) + (gap if i else 0)
        frequency = PITCHES[pitch] * (1.0 + float(rng.uniform(-MAX_DETUNE, MAX_DETUNE)))
        amplitude = float(rng.uniform(MIN_AMPLITUDE, MAX_AMPLITUDE))
        sounds.append(Sound(pitch, kind, frequency, amplitude, cursor, int(lengths[i]), bool(rng.random() < 0.5),
                            float(rng.uniform(0.0, 2 * math.pi))))
        cursor += int(lengths[i])
    noise_peak = 0.0 if rng.random() < 0.5 else float(rng.uniform(0.1, 1.0)) * MAX_NOISE_PEAK
    return Clip(rate, channels, frames, noise_peak, tuple(sounds))


def square_wave(frequency: float, rate: int, n: int, phase: float, band_limited: bool) -> npt.NDArray[np.float64]:
    """A square wave of unit peak: naive (the sign of a sine) or the sum of its odd harmonics below Nyquist."""
    t = np.arange(n) / rate  # (n,)
    if not band_limited:
        return np.where(np.sin(2 * math.pi * frequency * t + phase) >= 0.0, 1.0, -1.0)  # (n,)
    wave_ = np.zeros(n)  # (n,)
    harmonic = 1
    while harmonic * frequency < rate / 2:
        wave_ += np.sin(harmonic * (2 * math.pi * frequency * t + phase)) / harmonic
        harmonic += 2
    peak = float(np.abs(wave_).max())  # the Gibbs overshoot: normalised away below
    return wave_ / peak if peak > 0 else wave_


def synthesize(sound: Sound, rate: int) -> npt.NDArray[np.float64]:
    """One sound's samples: a sine (tone) or square (buzz) of peak `amplitude`, 10 ms linear fades in and out."""
    if sound.kind == "tone":
        t = np.arange(sound.length) / rate  # (L,)
        raw = np.sin(2 * math.pi * sound.frequency * t + sound.phase)  # (L,)
        raw = raw / float(np.abs(raw).max())  # a short sine need not reach its crest on a sample: make it
    elif sound.kind == "buzz":
        raw = square_wave(sound.frequency, rate, sound.length, sound.phase, sound.band_limited)  # (L,)
    else:
        raise ValueError(f"unknown kind {sound.kind!r}")
    fade = _samples(FADE_S, rate, False)
    envelope = np.ones(sound.length)  # (L,)
    ramp = np.arange(1, fade + 1) / fade  # (F,) from 1/F to 1
    envelope[:fade] = ramp
    envelope[-fade:] = ramp[::-1]
    return sound.amplitude * raw * envelope  # (L,)


def render(clip: Clip, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """The clip as (frames,) floats in [-1, 1]: the background (silence or white noise of the clip's peak), plus
    each sound in place."""
    if clip.noise_peak > 0:
        noise = rng.standard_normal(clip.frames)  # (N,)
        signal = noise * (clip.noise_peak / float(np.abs(noise).max()))  # (N,)
    else:
        signal = np.zeros(clip.frames)  # (N,)
    for sound in clip.sounds:
        signal[sound.start:sound.end] += synthesize(sound, clip.rate)
    return signal


def encode_wav(signal: npt.NDArray[np.float64], rate: int, channels: int) -> bytes:
    """16-bit PCM WAV bytes (stdlib `wave`), the same samples on every channel."""
    pcm = np.clip(np.rint(signal * FULL_SCALE), -FULL_SCALE - 1, FULL_SCALE).astype("<i2")  # (N,)
    frames = np.repeat(pcm[:, None], channels, axis=1)  # (N, C) interleaved on write
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(frames.tobytes())
    return buf.getvalue()


def clip_wav(clip: Clip, rng: np.random.Generator) -> bytes:
    """The clip rendered and written as WAV bytes."""
    return encode_wav(render(clip, rng), clip.rate, clip.channels)


# --------------------------------------------------------------------------------------------------- questions


def caption(clip: Clip) -> str:
    """The sounds in time order: `a low tone`, `a low tone and a high buzz`, `a low tone, a high buzz and a mid
    tone`."""
    phrases = [f"a {s.pitch} {s.kind}" for s in sorted(clip.sounds, key=lambda s: s.start)]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def ask(clip: Clip, kind: str, rng: np.random.Generator, present: bool | None = None) -> tuple[str, str] | None:
    """A (question, answer) of the given kind about the clip, or None when the table does not ask it of the clip.

    For `exists`, `present` picks a yes (a present pair) or a no (an absent pair); None picks at random.
    """
    sounds = clip.sounds
    if kind == "count":
        return "How many sounds are there?", COUNT_WORDS[len(sounds)]
    if kind == "pitch":
        by_kind = Counter(s.kind for s in sounds)
        unique = [s for s in sounds if by_kind[s.kind] == 1]
        if not unique:
            return None
        target = unique[int(rng.integers(len(unique)))]
        return f"What pitch is the {target.kind}?", target.pitch
    if kind == "kind":
        by_pitch = Counter(s.pitch for s in sounds)
        unique = [s for s in sounds if by_pitch[s.pitch] == 1]
        if not unique:
            return None
        target = unique[int(rng.integers(len(unique)))]
        return f"What kind of sound is the {target.pitch} one?", target.kind
    if kind == "exists":
        if present is None:
            present = bool(rng.random() < 0.5)
        have = {(s.pitch, s.kind) for s in sounds}
        pool = sorted(have) if present else [(p, k) for p in PITCHES for k in SOUND_KINDS if (p, k) not in have]
        pitch, sound_kind = pool[int(rng.integers(len(pool)))]
        return f"Is there a {pitch} {sound_kind}?", "yes" if present else "no"
    if kind == "caption":
        return "Describe the sound.", caption(clip)
    raise ValueError(f"unknown kind {kind!r}")


def _shuffled(values: list[str], rng: np.random.Generator) -> list[str]:
    """`values` in a random order."""
    return [values[i] for i in rng.permutation(len(values))]


def make_sounds_eval_records(n_questions: int, seed: int) -> list[tuple[SoundItem, Clip]]:
    """Like make_sounds_eval_set, each item paired with the clip its audio holds (one fresh clip per question)."""
    rng = np.random.default_rng(seed)
    kinds = _shuffled([KINDS[i % len(KINDS)] for i in range(n_questions)], rng)
    n_exists = kinds.count("exists")
    answers = ["yes"] * (n_exists // 2) + ["no"] * (n_exists // 2)
    if n_exists % 2:
        answers.append("yes" if rng.random() < 0.5 else "no")
    answers = _shuffled(answers, rng)
    records: list[tuple[SoundItem, Clip]] = []
    for kind in kinds:
        present = answers.pop() == "yes" if kind == "exists" else None
        while True:
            clip = sample_clip(rng)
            qa = ask(clip, kind, rng, present)
            if qa is not None:
                break
        records.append((SoundItem(clip_wav(clip, rng), "wav", qa[0], qa[1], kind), clip))
    logger.debug("sounds eval set: %d questions, seed %d, kinds %s", n_questions, seed, dict(Counter(kinds)))
    return records


def make_sounds_eval_set(n_questions: int, seed: int) -> list[SoundItem]:
    """`n_questions` items, kinds balanced (~20% each), exists ~50/50 yes/no; deterministic from `seed`."""
    return [item for item, _ in make_sounds_eval_records(n_questions, seed)]
