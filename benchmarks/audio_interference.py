"""Does audio preprocessing in the pool slow the engine? One decode stream's speed, alone and beside a
preprocessing thread that featurizes clips without pause, our way and transformers' torch way.

Not a unit test. The engine serves the embedded SHAPES model (text only, `ignore_eos`, `--tokens` tokens a run); a
long-lived pool thread (as the server's preprocessing pool is) loops over a 5 s 44.1 kHz stereo WAV:
- `none`: the thread idles;
- `ours`: `AudioPreparer.clip`: soundfile decode, soxr resample, numpy log-mel (what the server runs);
- `torch`: transformers' `WhisperFeatureExtractor` on the same waveform, whose torch STFT and matmul run in the pool
  thread and start an OpenMP team there beside the engine thread's.
The thread featurizes `--clips-per-s` clips a second (the same load in both ways: on two cores any busy thread takes
a share of them; what differs is the OpenMP team). Rounds interleave the modes; the JSON gives each mode's decode
tokens/s (median over rounds) and the clips/s it kept up.

    python benchmarks/audio_interference.py [--rounds 5] [--tokens 128] [--clips-per-s 4]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent


def clip(seconds: float = 5.0, rate: int = 44100) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wave = np.stack([0.4 * np.sin(2 * math.pi * 440 * t), 0.3 * np.sin(2 * math.pi * 660 * t)], axis=1)
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--clips-per-s", type=float, default=4.0)
    args = parser.parse_args(argv)
    from transformers import WhisperFeatureExtractor

    from vlmserve.model.audio_config import AudioEncoderConfig
    from vlmserve.model.audio_decode import AudioLimits, decode_audio
    from vlmserve.model.audio_features import AudioFeatureConfig
    from vlmserve.model.sampling import SamplingParams
    from vlmserve.model.tokenizer import ChatTokenizer
    from vlmserve.model.weights import load_model
    from vlmserve.server.engine import Engine, EngineConfig, Finished, TextDelta
    from vlmserve.server.engine.audio_prepare import AudioPreparer
    from vlmserve.server.engine.requests import EngineRequest

    ckpt = ROOT / "weights" / "shapes-llava"
    model, tokenizer = load_model(ckpt), ChatTokenizer.from_pretrained(ckpt)
    engine = Engine(model, tokenizer, EngineConfig(compile=False, max_running=4), model_id="interference").start()
    data = clip()
    ours = AudioPreparer(AudioEncoderConfig(num_mel_bins=128), AudioFeatureConfig(feature_size=128), AudioLimits())
    hf = WhisperFeatureExtractor(feature_size=128)
    wave = decode_audio(data, AudioLimits(), 16000)
    work = {"none": None, "ours": lambda: ours.clip(data, "wav"),
            "torch": lambda: hf(wave, sampling_rate=16000, padding="max_length", return_tensors="np")}
    pool = ThreadPoolExecutor(1, thread_name_prefix="preprocess")  # one long-lived pool thread, as served
    prompt = tokenizer.encode_chat([{"role": "user", "content": "count the shapes"}], num_image_tokens=0).input_ids

    def stream() -> float:
        req = EngineRequest("bench", list(prompt), sampling=SamplingParams(temperature=0), max_tokens=args.tokens,
                            ignore_eos=True)
        times = [time.perf_counter() for event in engine.generate(req) if isinstance(event, TextDelta | Finished)]
        return (len(times) - 2) / (times[-2] - times[0])  # decode tokens/s after the first token

    results: dict[str, list[float]] = {m: [] for m in work}
    clips: dict[str, list[float]] = {m: [] for m in work}
    stream()  # warm-up
    for _ in range(args.rounds):
        for mode, job in work.items():
            stop, done = threading.Event(), [0]

            def loop(job: object = job, stop: threading.Event = stop, done: list[int] = done) -> None:
                start = time.perf_counter()
                while not stop.is_set() and callable(job):
                    job()
                    done[0] += 1
                    stop.wait(max(0.0, start + done[0] / args.clips_per_s - time.perf_counter()))

            future = pool.submit(loop) if job is not None else None
            time.sleep(0.2)
            t0 = time.perf_counter()
            results[mode].append(stream())
            clips[mode].append(done[0] / (time.perf_counter() - t0 + 0.2))
            stop.set()
            if future is not None:
                future.result()
    engine.shutdown(timeout=5)
    out = {"benchmark": "audio_interference", "tokens": args.tokens, "rounds": args.rounds,
           "decode_tok_s": {m: round(statistics.median(v), 1) for m, v in results.items()},
           "decode_tok_s_all": {m: [round(x, 1) for x in v] for m, v in results.items()},
           "clips_per_s": {m: round(statistics.median(v), 1) for m, v in clips.items()}}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
