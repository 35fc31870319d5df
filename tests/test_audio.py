"""Audio in the same backbone (issue 14), against transformers on tiny random checkpoints built with its own classes:
Whisper features, greedy answers through the HTTP API for clips of several lengths, rates, channels and formats
(a Qwen2-Audio checkpoint, and a LLaVA checkpoint with an audio tower beside it, where images and clips mix),
batched = alone, the audio-token cache and metrics, /v1/generate's `audio` field, and hostile audio. Parametrized by
model, as tests/test_families.py is by family. Each model's server is the whole app in this process (starlette's
TestClient: middleware, routes, lifespan, engine thread and preprocessing pool as served), not a subprocess: two more
subprocess servers would cost the suite their start-up twice."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from audio_checkpoints import build_llava_audio, build_qwen2_audio, tone_clip
from audio_oracles import LlavaAudioOracle, Qwen2AudioOracle
from fastapi.testclient import TestClient
from live_server import LiveServer, free_port
from PIL import Image
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank

from vlmserve.model.audio_decode import AudioLimits, decode_audio
from vlmserve.model.audio_features import AudioFeatureConfig, FeatureExtractor, mel_filter_bank
from vlmserve.model.weights import load_model, save_model
from vlmserve.server.api import create_app
from vlmserve.server.settings import Settings

MODELS: dict[str, tuple[Callable[[Path], Path], type[Qwen2AudioOracle] | type[LlavaAudioOracle]]] = {
    "qwen2-audio": (build_qwen2_audio, Qwen2AudioOracle),
    "llava-audio": (build_llava_audio, LlavaAudioOracle),
}
# (format, sample rate, channels, seconds): lengths, rates that need resampling, stereo, and each container
CLIPS = [("WAV", 16000, 1, 1.0), ("FLAC", 44100, 2, 2.5), ("MP3", 22050, 1, 1.7), ("WAV", 48000, 2, 3.2)]
MAX_AUDIO_BYTES = 1_000_000


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    build, _ = MODELS[request.param]
    return request.param, build(tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def oracle(model: tuple[str, Path]) -> Qwen2AudioOracle | LlavaAudioOracle:
    name, ckpt = model
    return MODELS[name][1](ckpt)


@pytest.fixture(scope="module")
def server(model: tuple[str, Path]) -> Iterator[TestClient]:
    # A small KV pool: an app's engine is not freed when its TestClient closes (one app per process, as served), so
    # the default 1 GB pool would stay in the test process.
    settings = Settings(model=str(model[1]), served_model_name="aud", max_running=8, max_audio_bytes=MAX_AUDIO_BYTES,
                        compile=False, no_ui=True, kv_cache_mb=16)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the audio server did not get ready"
            time.sleep(0.05)
        yield client


def clip_bytes(fmt: str, rate: int, channels: int, seconds: float, seed: int = 0) -> bytes:
    return tone_clip(seconds, rate, freq=250.0 * (1 + seed), channels=channels, fmt=fmt, seed=seed)


def waveform(data: bytes) -> np.ndarray:
    """The clip as the oracle hears it: mono at 16 kHz (our decoding; the features are checked separately)."""
    return decode_audio(data, AudioLimits(), 16000)


def audio_part(data: bytes, fmt: str) -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt.lower()}}


def image_part(image: Image.Image) -> dict[str, Any]:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue())
                                               .decode()}}


def chat(question: str, parts: list[dict[str, Any]], max_tokens: int = 10) -> dict[str, Any]:
    return {"model": "aud", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]}


def ask(server: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    r = server.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def metric(server: TestClient, name: str) -> float:
    text = server.get("/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, flags=re.M)
    assert match is not None, name
    return float(match.group(1))


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))


# -- features ----------------------------------------------------------------------------------------------------


def test_features_equal_whisper_feature_extractor() -> None:
    """Our numpy log-mel equals transformers' WhisperFeatureExtractor within 1e-4, valid frames included, for clips of
    several lengths after decoding (resampling and channel averaging) at several rates; the filters equal its own."""
    for bins in (80, 128):
        ours = hf_mel_filter_bank(num_frequency_bins=201, num_mel_filters=bins, min_frequency=0.0,
                                  max_frequency=8000.0, sampling_rate=16000, norm="slaney", mel_scale="slaney")
        np.testing.assert_allclose(mel_filter_bank(num_frequency_bins=201, num_mel_filters=bins,
                                                   sampling_rate=16000), ours, atol=1e-7)
    extractor, hf = FeatureExtractor(AudioFeatureConfig(feature_size=80)), WhisperFeatureExtractor(feature_size=80)
    for i, (fmt, rate, channels, seconds) in enumerate([*CLIPS, ("WAV", 8000, 8, 0.33), ("FLAC", 16000, 1, 30.0)]):
        wave = waveform(clip_bytes(fmt, rate, channels, seconds, seed=i))
        features, frames = extractor(wave)
        want = hf(wave, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="np")
        assert frames == int(want["attention_mask"].sum())
        np.testing.assert_allclose(features, want["input_features"][0], atol=1e-4)


# -- through the HTTP API ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", CLIPS, ids=[f"{f}-{r}-{c}ch-{s}s" for f, r, c, s in CLIPS])
def test_greedy_answers_equal_transformers(server: TestClient, oracle: Qwen2AudioOracle | LlavaAudioOracle,
                                           clip: tuple[str, int, int, float]) -> None:
    data = clip_bytes(*clip)
    want, prompt_len = oracle.answer("what is the sound?", [waveform(data)])
    body = ask(server, chat("what is the sound?", [audio_part(data, clip[0])]))
    assert body["choices"][0]["message"]["content"] == oracle.tokenizer.decode(want, skip_special_tokens=True)
    assert body["usage"]["prompt_tokens"] == prompt_len
    assert body["usage"]["completion_tokens"] == len(want)


def test_two_clips_and_the_generate_field(server: TestClient, oracle: Qwen2AudioOracle | LlavaAudioOracle) -> None:
    """Two clips in one turn (in their order), and /v1/generate's repeatable `audio` file field."""
    a, b = clip_bytes("WAV", 16000, 1, 1.2, seed=3), clip_bytes("FLAC", 22050, 2, 0.8, seed=4)
    want, prompt_len = oracle.answer("which is higher?", [waveform(a), waveform(b)])
    body = ask(server, chat("which is higher?", [audio_part(a, "wav"), audio_part(b, "flac")]))
    assert body["choices"][0]["message"]["content"] == oracle.tokenizer.decode(want, skip_special_tokens=True)
    assert body["usage"]["prompt_tokens"] == prompt_len
    r = server.post("/v1/generate", data={"prompt": "which is higher?", "max_tokens": "10", "temperature": "0"},
                    files=[("audio", ("a.wav", a, "audio/wav")), ("audio", ("b.flac", b, "audio/flac"))])
    assert r.status_code == 200, r.text
    assert r.json()["text"] == body["choices"][0]["message"]["content"]


def test_batched_answers_equal_alone(server: TestClient) -> None:
    bodies = [chat(f"question {i}?", [audio_part(clip_bytes(*CLIPS[i % len(CLIPS)], seed=10 + i), CLIPS[i % 4][0])])
              for i in range(5)]
    bodies.append(chat("no sound here?", []))
    alone = [ask(server, b)["choices"][0]["message"]["content"] for b in bodies]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda b: ask(server, b)["choices"][0]["message"]["content"], bodies))
    assert alone == together


def test_repeated_clip_comes_from_the_caches(server: TestClient) -> None:
    """The same clip again: the same answer, not decoded again (a lease of its cached tokens: no audio preprocessing
    observed), an audio cache hit, and its prompt blocks reused; the vision metrics do not count it."""
    data = clip_bytes("FLAC", 16000, 1, 2.0, seed=21)
    first = ask(server, chat("again?", [audio_part(data, "flac")]))
    decoded = metric(server, "vlmserve:audio_preprocess_seconds_count")
    hits = metric(server, "vlmserve:audio_cache_hits_total")
    clips = metric(server, "vlmserve:audio_clips_encoded_total")
    vision_hits = metric(server, "vlmserve:vision_cache_hits_total")
    again = ask(server, chat("again?", [audio_part(data, "flac")]))
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert metric(server, "vlmserve:audio_preprocess_seconds_count") == decoded
    assert metric(server, "vlmserve:audio_cache_hits_total") == hits + 1
    assert metric(server, "vlmserve:audio_clips_encoded_total") == clips
    assert metric(server, "vlmserve:vision_cache_hits_total") == vision_hits
    assert metric(server, "vlmserve:audio_encoder_seconds_count") >= 1


def test_images_and_clips_mix_in_their_order(model: tuple[str, Path], server: TestClient,
                                             oracle: Qwen2AudioOracle | LlavaAudioOracle) -> None:
    """With both towers, image and audio parts in their order (chat), images first then audio (/v1/generate); a
    model without a vision tower refuses image parts with a 400 naming the part."""
    a = clip_bytes("MP3", 16000, 1, 1.4, seed=30)
    image = picture(31)
    if model[0] == "qwen2-audio":
        r = server.post("/v1/chat/completions", json=chat("hi", [audio_part(a, "mp3"), image_part(image)]))
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.1.image_url", r.text
        return
    for parts in (["audio", "image"], ["image", "audio", "audio"]):
        clips = [waveform(a)] * parts.count("audio")
        want, prompt_len = oracle.answer("what is it?", clips, [image] * parts.count("image"), parts)
        content = [audio_part(a, "mp3") if p == "audio" else image_part(image) for p in parts]
        body = ask(server, chat("what is it?", content))
        assert body["choices"][0]["message"]["content"] == oracle.tokenizer.decode(want, skip_special_tokens=True)
        assert body["usage"]["prompt_tokens"] == prompt_len
    want, _ = oracle.answer("what is it?", [waveform(a)], [image], ["image", "audio"])
    buf = io.BytesIO()
    image.save(buf, "PNG")
    r = server.post("/v1/generate", data={"prompt": "what is it?", "max_tokens": "10", "temperature": "0"},
                    files=[("audio", ("a.mp3", a, "audio/mpeg")), ("image", ("i.png", buf.getvalue(), "image/png"))])
    assert r.status_code == 200, r.text
    assert r.json()["text"] == oracle.tokenizer.decode(want, skip_special_tokens=True)


# -- checkpoints -------------------------------------------------------------------------------------------------


def test_our_saves_round_trip_and_load_in_transformers(model: tuple[str, Path],
                                                       oracle: Qwen2AudioOracle | LlavaAudioOracle,
                                                       tmp_path: Path) -> None:
    """save_model writes Qwen2-Audio's Hub layout (transformers loads it: the same logits), or the LLaVA layout plus
    the `audio/` folder; either loads back here tensor for tensor."""
    name, ckpt = model
    ours = load_model(ckpt)
    out = save_model(ours, tmp_path / "saved", copy_from=ckpt)
    a, b = ours.state_dict(), load_model(out).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reloaded = MODELS[name][1](out)
    inputs = oracle.inputs("hello", [waveform(clip_bytes("WAV", 16000, 1, 1.1))])
    call = {k: v for k, v in inputs.items() if k != "input_ids"} if "inputs_embeds" in inputs else inputs
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(**call).logits, oracle.model(**call).logits)
        if name == "llava-audio":  # the audio tower itself, through transformers' encoder
            torch.testing.assert_close(reloaded.inputs("hello", [waveform(clip_bytes("WAV", 16000, 1, 1.1))])[
                "inputs_embeds"], inputs["inputs_embeds"])


# -- hostile audio -----------------------------------------------------------------------------------------------


def wav(*, channels: int = 1, rate: int = 16000, claimed: int | None = None, data: bytes = bytes(32000)) -> bytes:
    """A PCM-16 WAV whose header says what we like."""
    block = channels * 2
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", claimed or len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def mp3_bomb() -> bytes:
    """60 s of silence at 8 kHz in ~60 KB: far more samples than its size suggests (and past any window)."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros(8000 * 60, dtype=np.float32), 8000, format="MP3", subtype="MPEG_LAYER_III")
    return buf.getvalue()


def test_hostile_audio_is_refused_and_the_server_lives(server: TestClient) -> None:
    good = clip_bytes("WAV", 16000, 1, 1.0)
    cases = {
        "truncated": (good[: len(good) // 2], "wav", 400, "truncated"),
        "hours": (wav(claimed=2**31), "wav", 400, "--max-audio-seconds"),
        "16 channels": (wav(channels=16, data=bytes(32 * 100)), "wav", 400, "16 channels"),
        "1 MHz": (wav(rate=1_000_000), "wav", 400, "1000000 Hz"),
        "zero-length": (wav(data=b""), "wav", 400, "no samples"),
        "not audio": (b"<html>" + bytes(2000), "wav", 400, "not WAV, FLAC or MP3"),
        "bad header": (b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(64), "wav", 400, "cannot be read"),
        "mp3 bomb": (mp3_bomb(), "mp3", 400, "decodes to more than"),
        "format lies": (good, "mp3", 400, "declared as 'mp3'"),
        "over the byte cap": (clip_bytes("WAV", 48000, 2, 6.0), "wav", 413, "--max-audio-bytes"),
        "too short": (wav(data=bytes(40)), "wav", 400, "too short"),
    }
    for name, (data, fmt, status, words) in cases.items():
        r = server.post("/v1/chat/completions", json=chat("hi", [audio_part(data, fmt)]))
        assert r.status_code == status and words in r.json()["error"]["message"], (name, r.text)
        assert r.json()["error"]["param"] == "messages.0.content.0.input_audio", (name, r.text)
    r = server.post("/v1/chat/completions", json=chat("hi", [
        {"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}]))
    assert r.status_code == 400 and "base64" in r.json()["error"]["message"]
    r = server.post("/v1/chat/completions", json=chat("hi", [
        {"type": "input_audio", "input_audio": {"data": "", "format": "ogg"}}]))
    assert r.status_code == 400  # a format outside wav / mp3 / flac: the schema refuses it
    r = server.post("/v1/generate", data={"prompt": "hi"},
                    files=[("audio", ("a.wav", clip_bytes("WAV", 48000, 2, 6.0), "audio/wav"))])
    assert r.status_code == 413 and r.json()["error"]["param"] == "audio.0", r.text
    assert server.get("/health").status_code == 200
    assert ask(server, chat("still there?", [audio_part(good, "wav")]))["choices"][0]["message"]["content"] is not None


def test_nothing_is_decoded_past_the_duration_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The MP3 bomb is refused with at most the cap (and one sample) decoded; a lying WAV header with nothing."""
    from vlmserve.model.audio_decode import AudioError

    decoded: list[int] = []
    read = sf.SoundFile.read

    def counting(self: sf.SoundFile, *args: Any, **kwargs: Any) -> Any:
        out = read(self, *args, **kwargs)
        decoded.append(len(out))
        return out

    monkeypatch.setattr(sf.SoundFile, "read", counting)
    limits = AudioLimits(max_seconds=5.0)
    with pytest.raises(AudioError, match="decodes to more than"):
        decode_audio(mp3_bomb(), limits, 16000)
    assert 0 < sum(decoded) <= 5 * 8000 + 1
    decoded.clear()
    with pytest.raises(AudioError, match="--max-audio-seconds"):
        decode_audio(wav(claimed=2**31), limits, 16000)
    assert decoded == []


def test_a_model_without_an_audio_tower_refuses_audio_parts(live_server: LiveServer) -> None:
    body = chat("hi", [audio_part(clip_bytes("WAV", 16000, 1, 1.0), "wav")])
    body["model"] = "tiny-llava"
    r = httpx.post(live_server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages.0.content.0.input_audio" and "no audio tower" in error["message"]
    r = httpx.post(live_server.url + "/v1/generate", data={"prompt": "hi"}, timeout=30,
                   files=[("audio", ("a.wav", clip_bytes("WAV", 16000, 1, 1.0), "audio/wav"))])
    assert r.status_code == 400 and r.json()["error"]["param"] == "audio.0", r.text


# -- the README --------------------------------------------------------------------------------------------------


def test_readme_audio_examples(tmp_path: Path) -> None:
    """The README's audio examples (a clip of two beeps made in numpy, then curl and the openai SDK) against the
    embedded default model, which hears, served on a real socket (uvicorn in a thread of this process): each says
    `two`."""
    import uvicorn

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    examples = {lang: [b for b in re.findall(rf"```{lang}\n(.*?)```", readme, flags=re.S) if "beeps.wav" in b]
                for lang in ("bash", "python")}
    assert len(examples["bash"]) == 3 and len(examples["python"]) == 1
    made = subprocess.run(["bash", "-c", examples["bash"][0].replace("python - ", f"{sys.executable} - ")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and (tmp_path / "beeps.wav").is_file(), made.stderr
    port = free_port()
    app = create_app(Settings(compile=False, no_ui=True, max_running=4, kv_cache_mb=16))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the README's audio server did not get ready"
            time.sleep(0.05)
        env = {**os.environ, "NO_PROXY": "*"}
        for snippet in examples["bash"][1:]:
            if shutil.which("curl") is None:
                pytest.skip("curl is not installed")
            out = subprocess.run(["bash", "-c", snippet.replace("http://127.0.0.1:8000", url)], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=60, env=env)
            assert out.returncode == 0, out.stderr
            answer = json.loads(out.stdout)
            text = answer["choices"][0]["message"]["content"] if "choices" in answer else answer["text"]
            assert text.strip() == "two", out.stdout
        out = subprocess.run([sys.executable, "-c", examples["python"][0].replace("http://127.0.0.1:8000", url)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0 and out.stdout.strip() == "two", (out.stdout, out.stderr)
    finally:
        server.should_exit = True
        thread.join(30)
