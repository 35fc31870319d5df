"""The SOUNDS side of the training pipeline (training/sounds.py, hearing.py, hearing_instruct.py): the clip generator
follows SOUNDS.md, questions are asked only when its table says, dense labels mark the sounds, packed rows with a
prefix per row equal lone sequences, and a smoke hearing run on a SHAPES smoke model (every stage; losses fall)
exports a directory that
loads in vlmserve with its audio tower, in transformers as the LLaVA it is (equal logits), and answers clips over the
HTTP API."""

from __future__ import annotations

import base64
import io
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from fastapi.testclient import TestClient

from vlmserve.model.weights import load_model
from vlmserve.server.api import create_app
from vlmserve.server.settings import Settings
from vlmserve.training import sounds
from vlmserve.training.cli import train_main
from vlmserve.training.packing import pack_rows

BASE = Path(__file__).resolve().parents[1] / "weights" / "shapes-llava"


def test_clips_follow_the_spec() -> None:
    rng = random.Random(0)
    seen_rates, seen_counts = set(), set()
    for _ in range(200):
        clip = sounds.random_clip(rng)
        assert 1.0 <= clip.seconds <= 3.0 and clip.rate in sounds.RATES and 0 <= clip.noise <= 0.02
        pairs = [(s.pitch, s.kind) for s in clip.sounds]
        assert 1 <= len(pairs) <= 3 and len(set(pairs)) == len(pairs)
        assert clip.sounds[0].start >= 0.05 - 1e-9 and clip.sounds[-1].end <= clip.seconds - 0.05 + 1e-9
        for a, b in zip(clip.sounds, clip.sounds[1:], strict=False):
            assert b.start - a.end >= 0.10 - 1e-9
        for s in clip.sounds:
            assert 0.15 - 1e-9 <= s.length <= 0.40 + 1e-9 and 0.2 <= s.peak <= 0.8
            assert abs(s.freq / sounds.PITCH_HZ[s.pitch] - 1) <= 0.05
        seen_rates.add(clip.rate)
        seen_counts.add(len(pairs))
    assert seen_rates == set(sounds.RATES) and seen_counts == {1, 2, 3}


def test_wav_holds_the_sounds_at_their_pitch() -> None:
    rng = random.Random(3)
    for _ in range(12):
        clip = sounds.random_clip(rng)
        data, rate = sf.read(io.BytesIO(sounds.wav_bytes(clip, rng)), always_2d=True)  # (N, C)
        assert rate == clip.rate and len(data) == round(clip.seconds * rate) and data.shape[1] == clip.channels
        assert np.array_equal(data[:, 0], data[:, -1])
        for s in clip.sounds:
            seg = data[round(s.start * rate) : round(s.end * rate), 0]  # (n,)
            assert 0.8 * s.peak <= np.abs(seg).max() <= s.peak + clip.noise + 1e-3
            spectrum = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))  # (n / 2 + 1,)
            peak_hz = np.argmax(spectrum) * rate / len(seg)
            assert abs(peak_hz / s.freq - 1) < 0.05, (s, peak_hz)
            third = spectrum[round(3 * s.freq * len(seg) / rate)] / spectrum.max()
            assert (third > 0.1) == (s.kind == "buzz"), (s, third)


def test_questions_follow_the_table() -> None:
    rng = random.Random(1)
    for _ in range(300):
        clip = sounds.random_clip(rng)
        for kind in sounds.QUESTION_KINDS:
            qa = sounds.question_for(clip, kind, rng)
            kinds = [s.kind for s in clip.sounds]
            pitches = [s.pitch for s in clip.sounds]
            if kind == "pitch":
                assert (qa is None) == all(kinds.count(k) != 1 for k in sounds.SOUND_KINDS)
                if qa:
                    (only,) = clip.with_kind(qa[0].removeprefix("What pitch is the ").rstrip("?"))
                    assert qa[1] == only.pitch
            elif kind == "kind":
                assert (qa is None) == all(pitches.count(p) != 1 for p in sounds.PITCHES)
            else:
                assert qa is not None
    three = sounds.Clip(tuple(sounds.Sound(p, k, 0.1 + i, 0.2, sounds.PITCH_HZ[p], 0.5, False)
                              for i, (p, k) in enumerate([("low", "tone"), ("high", "buzz"), ("mid", "tone")])),
                        3.0, 16000, 0.0, 1)
    assert sounds.caption(three) == "a low tone, a high buzz and a mid tone"
    assert sounds.question_for(three, "count", rng) == ("How many sounds are there?", "three")
    assert sounds.question_for(three, "pitch", rng) == ("What pitch is the buzz?", "high")
    assert sounds.caption(sounds.Clip(three.sounds[:2], 3.0, 16000, 0.0, 1)) == "a low tone and a high buzz"


def test_token_labels_mark_each_sound() -> None:
    s1 = sounds.Sound("mid", "buzz", 0.20, 0.20, 500.0, 0.5, False)
    s2 = sounds.Sound("low", "tone", 0.60, 0.30, 250.0, 0.5, False)
    labels = sounds.token_labels(sounds.Clip((s1, s2), 1.2, 16000, 0.0, 1), n_tokens=40, valid=30)  # (5, 40)
    assert labels[:, 30:].tolist() == [[-100] * 10] * 5
    assert set(labels[0, 5:10]) == {sounds.SOUND_PAIRS.index(("mid", "buzz")) + 1}  # 0.20-0.40 s
    assert set(labels[3, 15:22]) == {2} and labels[0, 12] == 0 and labels[0, 0] == 0
    assert set(labels[4, :30]) == {1}


def test_packed_rows_with_a_prefix_each_equal_lone_sequences() -> None:
    lm = load_model(BASE).language_model
    prefixes = [[1, 5, 6, 7], [1, 8]]
    segments = [[([9, 10], [11, 2]), ([12], [13, 14, 2])], [([15, 16, 17], [18, 2])]]
    ids, positions, mask, _ = pack_rows(prefixes, segments, 0)
    with torch.no_grad():
        packed = lm(inputs_embeds=lm.embed_tokens(ids), positions=positions, mask=mask)  # (B, T, V)
        for b, (prefix, segs) in enumerate(zip(prefixes, segments, strict=True)):
            at = len(prefix)
            for prompt, answer in segs:
                lone = torch.tensor([prefix + prompt + answer])  # (1, L)
                want = lm(lone)[0, len(prefix):]  # (n, V)
                torch.testing.assert_close(packed[b, at : at + len(want)], want, rtol=1e-4, atol=1e-4)
                at += len(prompt) + len(answer)


@pytest.fixture(scope="module")
def hearing_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline in order: a SHAPES smoke model, then the hearing stages on top of it."""
    shapes = tmp_path_factory.mktemp("shapes-run")
    assert train_main(["--out", str(shapes), "--config", "smoke"]) == 0
    out = tmp_path_factory.mktemp("hearing-run")
    assert train_main(["--out", str(out), "--config", "hearing-smoke", "--base", str(shapes / "model")]) == 0
    return out


def test_every_hearing_stage_loss_falls(hearing_run: Path) -> None:
    summary = json.loads((hearing_run / "summary.json").read_text())
    for stage in ("hear", "hear-instruct"):
        curve = summary[f"stage_{stage}"]["curve"]
        assert curve[-1] < curve[0], (stage, curve)
    assert set(summary["stage_hear-instruct"]["heldout_exact_match"]) >= {"sounds/count", "shapes/color"}


def test_the_hearing_export_loads_everywhere_and_answers_clips(hearing_run: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    model_dir = hearing_run / "model"
    assert {p.name for p in (model_dir / "audio").iterdir()} == {"config.json", "model.safetensors",
                                                                 "preprocessor_config.json"}
    ours = load_model(model_dir)
    assert ours.audio is not None and ours.config.text.vocab_size == ours.config.audio.audio_token_index + 1
    theirs = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 3, *([3] * (ours.config.num_visual_tokens - 1)), 40, 41, 42]])  # (1, T)
    side = ours.config.vision.image_size  # type: ignore[union-attr]
    pixels = torch.randn(1, 3, side, side)  # (1, 3, H, W)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixel_values=pixels), theirs(input_ids=ids, pixel_values=pixels).logits,
                                   rtol=1e-4, atol=1e-4)
    rng = random.Random(5)
    clip = sounds.random_clip(rng)
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(sounds.wav_bytes(clip, rng)).decode(),
                                                  "format": "wav"}}
    settings = Settings(model=str(model_dir), served_model_name="hear", compile=False, no_ui=True, kv_cache_mb=8)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the hearing model's server did not get ready"
            time.sleep(0.05)
        body = {"model": "hear", "max_tokens": 6, "temperature": 0, "messages": [
            {"role": "user", "content": [part, {"type": "text", "text": "How many sounds are there?"}]}]}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        n_tokens = ours.config.audio.encoder.num_tokens(round(clip.seconds * 100))
        assert r.json()["usage"]["prompt_tokens"] >= n_tokens
