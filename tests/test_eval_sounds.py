"""training/eval_sounds.py: the independent SOUNDS renderer and question set follow /work/shared/SOUNDS.md (every
clip read back with the stdlib `wave` module, each sound's pitch and kind measured from its spectrum), and
`vlmserve eval --world sounds` scores a real server (and the engine in-process, with the same answers)."""

from __future__ import annotations

import io
import itertools
import json
import math
import re
import wave
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from audio_checkpoints import build_llava_audio
from live_server import LiveServer, start_server

from vlmserve.training.eval_sounds import (
    KINDS,
    PITCHES,
    RATES,
    SOUND_KINDS,
    Clip,
    Sound,
    SoundItem,
    ask,
    caption,
    make_sounds_eval_records,
    make_sounds_eval_set,
    square_wave,
)
from vlmserve.training.eval_world import grade, normalize, score

Q = 1 / 32767  # one 16-bit step
COUNTS = {"one": 1, "two": 2, "three": 3}
QUESTIONS = {
    "count": re.compile(r"How many sounds are there\?"),
    "pitch": re.compile(r"What pitch is the (tone|buzz)\?"),
    "kind": re.compile(r"What kind of sound is the (low|mid|high) one\?"),
    "exists": re.compile(r"Is there a (low|mid|high) (tone|buzz)\?"),
    "caption": re.compile(r"Describe the sound\."),
}


@pytest.fixture(scope="module")
def records() -> list[tuple[SoundItem, Clip]]:
    return make_sounds_eval_records(150, seed=99)


def read_wav(data: bytes) -> tuple[int, npt.NDArray[np.float64]]:
    """(rate, (N, C) samples in [-1, 1]) of 16-bit PCM WAV bytes, read with the stdlib only."""
    with wave.open(io.BytesIO(data), "rb") as f:
        assert f.getsampwidth() == 2 and f.getcomptype() == "NONE"
        rate, channels, frames = f.getframerate(), f.getnchannels(), f.getnframes()
        pcm = np.frombuffer(f.readframes(frames), dtype="<i2")  # (N * C,)
    assert pcm.size == frames * channels
    return rate, pcm.reshape(frames, channels) / 32767.0  # (N, C)


def spectrum_peak(segment: npt.NDArray[np.float64], rate: int, near: float, width: float) -> tuple[float, float]:
    """(frequency, magnitude) of the strongest spectral line within `near` +- `width` (Hann window, zero-padded
    to 8x, parabolic interpolation between bins)."""
    n_fft = 1 << math.ceil(math.log2(8 * len(segment)))
    mag = np.abs(np.fft.rfft(segment * np.hanning(len(segment)), n_fft))  # (n_fft // 2 + 1,)
    freqs = np.fft.rfftfreq(n_fft, 1 / rate)  # (n_fft // 2 + 1,)
    band = np.flatnonzero((freqs >= near - width) & (freqs <= near + width))  # (B,)
    i = int(band[np.argmax(mag[band])])
    a, b, c = np.log(mag[i - 1 : i + 2] + 1e-12)
    shift = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c != 0 else 0.0
    return float((i + shift) * rate / n_fft), float(mag[i])


# --------------------------------------------------------------------------------------------------- clips


def test_wav_format_rates_channels_and_durations(records: list[tuple[SoundItem, Clip]]) -> None:
    seen_rates, seen_channels = set(), set()
    for item, clip in records:
        assert item.format == "wav" and item.audio[:4] == b"RIFF" and item.audio[8:12] == b"WAVE"
        rate, x = read_wav(item.audio)
        assert rate in RATES and rate == clip.rate
        assert x.shape[1] in (1, 2) and x.shape[1] == clip.channels
        assert np.array_equal(x[:, 0], x[:, -1]), "stereo channels must be identical"
        assert 1.0 <= x.shape[0] / rate <= 3.0
        seen_rates.add(rate)
        seen_channels.add(x.shape[1])
    assert seen_rates == set(RATES) and seen_channels == {1, 2}


def test_timing_pairs_and_counts(records: list[tuple[SoundItem, Clip]]) -> None:
    counts = Counter()
    for item, clip in records:
        sounds = clip.sounds
        counts[len(sounds)] += 1
        assert 1 <= len(sounds) <= 3
        assert len({(s.pitch, s.kind) for s in sounds}) == len(sounds), "no two sounds share a (pitch, kind)"
        assert list(sounds) == sorted(sounds, key=lambda s: s.start)
        rate, x = read_wav(item.audio)
        for s in sounds:
            assert 0.15 <= s.length / rate <= 0.40
        assert sounds[0].start / rate >= 0.05
        assert (x.shape[0] - sounds[-1].end) / rate >= 0.05
        for a, b in itertools.pairwise(sounds):
            assert (b.start - a.end) / rate >= 0.10, "sounds overlap or sit closer than 0.10 s"
    assert set(counts) == {1, 2, 3}


def test_background_and_amplitudes_read_back(records: list[tuple[SoundItem, Clip]]) -> None:
    """Outside the sounds: silence (exact zeros) or noise of peak <= 0.02; each sound peaks at its amplitude, in
    0.2..0.8, rising and falling through 10 ms linear fades."""
    backgrounds = Counter()
    for item, clip in records:
        rate, x = read_wav(item.audio)
        mono = x[:, 0]  # (N,)
        outside = np.ones(len(mono), dtype=bool)  # (N,)
        for s in clip.sounds:
            outside[s.start : s.end] = False
        background = float(np.abs(mono[outside]).max())
        assert background <= 0.02 + Q
        assert background <= clip.noise_peak + Q
        backgrounds["noise" if clip.noise_peak > 0 else "silence"] += 1
        if clip.noise_peak == 0:
            assert background == 0.0
        noise = clip.noise_peak + Q
        fade = round(0.010 * rate)
        for s in clip.sounds:
            assert 0.2 <= s.amplitude <= 0.8
            segment = mono[s.start : s.end]  # (L,)
            assert abs(float(np.abs(segment).max()) - s.amplitude) <= noise + Q
            assert float(np.abs(segment[: fade // 2]).max()) <= 0.5 * s.amplitude + noise + Q  # fading in
            assert float(np.abs(segment[-(fade // 2) :]).max()) <= 0.5 * s.amplitude + noise + Q  # fading out
            assert float(np.abs(segment[fade : 2 * fade]).max()) >= 0.9 * s.amplitude - noise  # full level after
    assert set(backgrounds) == {"noise", "silence"}


def test_pitch_and_kind_measured_from_the_spectrum(records: list[tuple[SoundItem, Clip]]) -> None:
    """Each sound's fundamental (FFT of its segment) is within +-5% of its pitch's nominal frequency; a buzz has a
    strong third harmonic (a square's is 1/3 of the fundamental), a tone none."""
    kinds, variants = Counter(), Counter()
    for item, clip in records[:80]:
        rate, x = read_wav(item.audio)
        for s in clip.sounds:
            nominal = PITCHES[s.pitch]
            assert abs(s.frequency / nominal - 1) <= 0.05
            segment = x[s.start : s.end, 0]  # (L,)
            f0, m1 = spectrum_peak(segment, rate, nominal, 0.06 * nominal)
            assert abs(f0 / nominal - 1) <= 0.05, (s, f0)
            assert abs(f0 - s.frequency) <= 0.005 * s.frequency, (s, f0)
            _, m3 = spectrum_peak(segment, rate, 3 * f0, 0.02 * f0)
            ratio = m3 / m1
            if s.kind == "buzz":
                assert 0.2 <= ratio <= 0.45, (s, ratio)
                variants["band-limited" if s.band_limited else "naive"] += 1
            else:
                assert ratio <= 0.02, (s, ratio)
            kinds[s.kind] += 1
    assert set(kinds) == set(SOUND_KINDS) and set(variants) == {"band-limited", "naive"}


def test_band_limited_square_holds_only_odd_harmonics_below_nyquist() -> None:
    rate, f = 16000, 1000.0
    wave_ = square_wave(f, rate, rate, 0.0, band_limited=True)  # (rate,): 1 s, 1 Hz bins
    assert abs(float(np.abs(wave_).max()) - 1.0) < 1e-12
    mag = np.abs(np.fft.rfft(wave_)) / (rate / 2)  # (rate // 2 + 1,)
    lines = {round(k * f) for k in (1, 3, 5, 7)}  # 9000 Hz is past Nyquist
    assert all(mag[i] > 0.05 for i in lines)
    rest = np.delete(mag, sorted(lines))  # (rate // 2 - 3,)
    assert float(rest.max()) < 1e-6
    naive = square_wave(f, rate, 64, 0.3, band_limited=False)  # (64,)
    assert set(np.unique(naive)) <= {-1.0, 1.0}


# --------------------------------------------------------------------------------------------------- questions


def sound(pitch: str, kind: str, start: int) -> Sound:
    return Sound(pitch, kind, PITCHES[pitch], 0.5, start, 3000, False, 0.0)


def test_caption_wording_in_time_order() -> None:
    def clip(*sounds: Sound) -> Clip:
        return Clip(16000, 1, 32000, 0.0, sounds)

    low, high, mid = sound("low", "tone", 1000), sound("high", "buzz", 8000), sound("mid", "tone", 15000)
    assert caption(clip(low)) == "a low tone"
    assert caption(clip(low, high)) == "a low tone and a high buzz"
    assert caption(clip(low, high, mid)) == "a low tone, a high buzz and a mid tone"
    assert caption(clip(mid, low, high)) == "a low tone, a high buzz and a mid tone"  # time order, not list order


def test_questions_only_when_the_table_allows() -> None:
    rng = np.random.default_rng(0)
    two_tones = Clip(16000, 1, 32000, 0.0, (sound("low", "tone", 1000), sound("high", "tone", 8000)))
    assert all(ask(two_tones, "pitch", rng) is None for _ in range(20)), "two tones and no buzz: no pitch question"
    assert ask(two_tones, "kind", rng) in {("What kind of sound is the low one?", "tone"),
                                           ("What kind of sound is the high one?", "tone")}
    two_lows = Clip(16000, 1, 32000, 0.0, (sound("low", "tone", 1000), sound("low", "buzz", 8000)))
    assert all(ask(two_lows, "kind", rng) is None for _ in range(20))
    assert {ask(two_lows, "pitch", rng) for _ in range(20)} == {("What pitch is the tone?", "low"),
                                                                ("What pitch is the buzz?", "low")}
    assert ask(two_lows, "count", rng) == ("How many sounds are there?", "two")
    absent = ask(two_lows, "exists", rng, present=False)
    assert absent is not None and absent[1] == "no"
    assert absent[0] not in {"Is there a low tone?", "Is there a low buzz?"}
    assert ask(two_lows, "exists", rng, present=True) in {("Is there a low tone?", "yes"),
                                                          ("Is there a low buzz?", "yes")}


def test_every_answer_is_right_for_its_clip(records: list[tuple[SoundItem, Clip]]) -> None:
    for item, clip in records:
        match = QUESTIONS[item.kind].fullmatch(item.question)
        assert match is not None, item.question
        sounds = clip.sounds
        if item.kind == "count":
            assert COUNTS[item.answer] == len(sounds)
        elif item.kind == "pitch":
            same = [s for s in sounds if s.kind == match.group(1)]
            assert len(same) == 1 and item.answer == same[0].pitch
        elif item.kind == "kind":
            same = [s for s in sounds if s.pitch == match.group(1)]
            assert len(same) == 1 and item.answer == same[0].kind
        elif item.kind == "exists":
            present = (match.group(1), match.group(2)) in {(s.pitch, s.kind) for s in sounds}
            assert item.answer == ("yes" if present else "no")
        else:
            phrases = [f"a {s.pitch} {s.kind}" for s in sorted(sounds, key=lambda s: s.start)]
            expected = {1: "{}", 2: "{} and {}", 3: "{}, {} and {}"}[len(phrases)].format(*phrases)
            assert item.answer == expected
        assert item.answer == normalize(item.answer), "answers are lowercase words without a trailing period"


def test_kinds_balanced_and_exists_half_absent() -> None:
    items = make_sounds_eval_set(103, seed=4)
    counts = Counter(it.kind for it in items)
    assert set(counts) == set(KINDS) and max(counts.values()) - min(counts.values()) <= 1
    exists = Counter(it.answer for it in items if it.kind == "exists")
    assert abs(exists["yes"] - exists["no"]) <= 1


def test_deterministic_from_seed() -> None:
    assert make_sounds_eval_set(15, seed=5) == make_sounds_eval_set(15, seed=5)
    assert make_sounds_eval_set(15, seed=5) != make_sounds_eval_set(15, seed=6)


def test_grader_and_score() -> None:
    assert normalize("  A Low Tone. \n") == "a low tone"
    assert grade(" High.", "high") and grade("YES", "yes")
    assert not grade("high..", "high") and not grade("high!", "high") and not grade("a low tone,", "a low tone")
    items = [SoundItem(b"", "wav", "q", "one", "count"), SoundItem(b"", "wav", "q", "low", "pitch")]
    result = score(items, ["one.", "mid"], KINDS)
    assert result["n"] == 2 and result["correct"] == 1 and list(result["per_kind"]) == list(KINDS)
    assert result["per_kind"]["count"]["accuracy"] == 1.0 and math.isnan(result["per_kind"]["caption"]["accuracy"])


def test_each_kinds_answer_schema_accepts_exactly_its_answers(records: list[tuple[SoundItem, Clip]]) -> None:
    import jsonschema

    from vlmserve.training.evaluate_sounds import sounds_answer_schema

    for item, _ in records:
        jsonschema.validate(item.answer, sounds_answer_schema(item.kind))
    for wrong, kind in [("a low tone", "pitch"), ("tone", "count"), ("a low tone and", "caption"),
                        ("a low tone and a mid tone and a high tone", "caption"), ("maybe", "exists")]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, sounds_answer_schema(kind))


# --------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def llava_audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llava_audio(tmp_path_factory.mktemp("llava-audio"))


@pytest.fixture(scope="module")
def audio_server(llava_audio: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(llava_audio, tmp_path_factory.mktemp("sounds-logs"), "--served-model-name", "aud",
                          "--max-running", "8", "--kv-cache-mb", "16")
    yield server
    server.stop()


def test_eval_sounds_over_http_and_through_the_engine(audio_server: LiveServer, llava_audio: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`vlmserve eval --world sounds --url` against a real server: n=10, two questions of each kind (the random
    model's accuracy is whatever it is); `--model` (the engine in this process) gives the same answers."""
    from vlmserve.server.cli import main

    args = ["eval", "--world", "sounds", "--n", "10", "--seed", "3", "--json"]
    assert main([*args, "--url", audio_server.url]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 10 and list(result["per_kind"]) == list(KINDS)
    assert all(r["n"] == 2 and 0 <= r["correct"] <= 2 for r in result["per_kind"].values())
    assert sum(r["correct"] for r in result["per_kind"].values()) == result["correct"]
    assert len(result["mistakes"]) == 10 - result["correct"]
    assert all(set(m) == {"kind", "question", "answer", "got"} for m in result["mistakes"])

    assert main([*args, "--model", str(llava_audio)]) == 0
    local = json.loads(capsys.readouterr().out)
    assert local["per_kind"] == result["per_kind"]
    assert [(m["question"], m["got"].strip()) for m in local["mistakes"]] == \
        [(m["question"], m["got"].strip()) for m in result["mistakes"]]

    assert main(["eval", "--world", "sounds", "--n", "5", "--seed", "3", "--url", audio_server.url,
                 "--json-schema"]) == 0
    table = capsys.readouterr().out
    assert all(re.search(rf"^{kind}\s+\d+\s+1\s", table, flags=re.M) for kind in KINDS)
    assert re.search(r"^overall\s+\d+\s+5\s", table, flags=re.M)


def test_eval_sounds_refuses_a_model_that_cannot_hear(live_server: LiveServer, clip_llama: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Against a server (and a checkpoint) without an audio tower: one line on stderr, exit status 1."""
    from vlmserve.training.cli import eval_main

    assert eval_main(["--world", "sounds", "--url", live_server.url, "--n", "2"]) == 1
    err = capsys.readouterr().err
    assert "vlmserve eval: HTTP 400" in err and "no audio tower" in err and "Traceback" not in err
    assert eval_main(["--world", "sounds", "--model", str(clip_llama), "--n", "2"]) == 1
    err = capsys.readouterr().err
    assert "vlmserve eval:" in err and "no audio tower" in err and "Traceback" not in err
