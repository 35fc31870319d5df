"""Evaluation on the independent SOUNDS renderer (`training/eval_sounds.py`): per-kind exact match through the
serving engine in this process (each clip decoded and featurized by the server's own `AudioPreparer`), or through
a running server's OpenAI-compatible HTTP API (`input_audio` parts), greedy either way.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vlmserve.model.images import ImageProcessor
from vlmserve.model.tokenizer import ChatTokenizer
from vlmserve.model.weights import load_model

from .eval_sounds import COUNT_WORDS, KINDS, PITCHES, SOUND_KINDS, SoundItem, make_sounds_eval_set
from .evaluate import constrained_answer, engine_answers, serving_settings, summarize

# The longest answer, `a low tone, a high buzz and a mid tone`, is 38 bytes. A tokenizer that knows the words makes
# it ~11 tokens, but the shipped SHAPES tokenizer, which never saw them, makes it 27 (SHAPES' 24 would cut it): 40
# holds it even one token per byte (a leading space, 38 bytes, the end of turn). Only wrong answers run that long.
MAX_TOKENS = 40


class NoAudioTower(ValueError):
    """The checkpoint cannot hear: SOUNDS needs a model with an audio tower."""


def sounds_eval_items(n: int, seed: int) -> list[SoundItem]:
    """The independent renderer's question set (kinds balanced)."""
    return make_sounds_eval_set(n, seed)


def engine_messages(question: str) -> list[dict[str, Any]]:
    """The chat the server makes of a SOUNDS request (server/inputs.py): the clip's slot, then the question."""
    return [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": question}]}]


def http_message(item: SoundItem) -> dict[str, Any]:
    """One user turn as SOUNDS.md asks it over the chat API: the `input_audio` part first, then the text part."""
    clip = {"data": base64.b64encode(item.audio).decode("ascii"), "format": item.format}
    return {"role": "user", "content": [{"type": "input_audio", "input_audio": clip},
                                        {"type": "text", "text": item.question}]}


def sounds_answer_schema(kind: str) -> dict[str, Any]:
    """The JSON schema of a SOUNDS question kind's answers: an enum, or for captions the pattern they all follow."""
    if kind == "count":
        return {"enum": list(COUNT_WORDS.values())}
    if kind == "pitch":
        return {"enum": list(PITCHES)}
    if kind == "kind":
        return {"enum": list(SOUND_KINDS)}
    if kind == "exists":
        return {"enum": ["yes", "no"]}
    if kind == "caption":
        thing = f"a ({'|'.join(PITCHES)}) ({'|'.join(SOUND_KINDS)})"
        return {"type": "string", "pattern": f"^{thing}(( and {thing})|(, {thing} and {thing}))?$"}
    raise ValueError(f"unknown kind {kind!r}")


def evaluate_sounds_engine(model_dir: str | Path, items: Sequence[SoundItem], *, max_running: int = 16,
                           progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """Score a checkpoint directory on `items` through the serving engine (continuous batching, greedy), each clip
    prepared as the server prepares it (decode, resample, Whisper features, audio-token count), without HTTP.
    NoAudioTower when the checkpoint has none. `progress` is called once per answered question."""
    from vlmserve.model.sampling import SamplingParams
    from vlmserve.server.engine.audio_prepare import AudioPreparer
    from vlmserve.server.engine.prepare import RequestPreparer

    model = load_model(model_dir)
    if model.config.audio is None:
        raise NoAudioTower(f"{model_dir} has no audio tower: the SOUNDS world needs a model that hears")
    chat = ChatTokenizer.from_pretrained(model_dir)
    # As the server does (server/state.py): a model without a vision tower still gets a (never used) processor.
    processor = (ImageProcessor.from_pretrained(model_dir) if model.config.vision is not None
                 else ImageProcessor.for_vision_model("clip_vision_model", 224))
    preparer = RequestPreparer(chat, processor, model.config.num_visual_tokens)
    settings = serving_settings(model_dir, max_running)
    audio = AudioPreparer.for_checkpoint(Path(model_dir), model.config.audio.encoder, settings.audio_limits())
    requests = (preparer.request(str(i), engine_messages(item.question), sampling=SamplingParams(temperature=0.0),
                                 max_tokens=MAX_TOKENS, audio=[audio.clip(item.audio, item.format)])
                for i, item in enumerate(items))
    t0 = time.perf_counter()
    preds = engine_answers(model, chat, Path(model_dir).name, requests, settings.engine_config(), progress=progress)
    return summarize(items, preds, time.perf_counter() - t0, KINDS)


def evaluate_sounds_url(base_url: str, items: Sequence[SoundItem], *, model: str | None = None, workers: int = 8,
                        json_schema: bool = False, progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """Score a running server on `items` through POST {base}/v1/chat/completions (temperature 0, max_tokens 40),
    each question one user turn of an `input_audio` part (base64 WAV) and the text. With `json_schema`, each answer
    is constrained by `response_format` to its kind's `sounds_answer_schema` (a JSON string) and graded as the
    string it holds. An error answer raises the client's `VlmserveError` (a model without an audio tower: a 400
    `unsupported_audio`). `progress` is called once per answered question."""
    from vlmserve_client import Client

    def ask(client: Client, item: SoundItem) -> str:
        schema = {"name": item.kind, "schema": sounds_answer_schema(item.kind)}
        response_format = {"type": "json_schema", "json_schema": schema} if json_schema else None
        # The client's `chat` sends images only; its documented `extra_body` override carries the audio turn.
        content = client.chat(item.question, model=model, temperature=0, max_tokens=MAX_TOKENS,
                              response_format=response_format, extra_body={"messages": [http_message(item)]}).text
        answer = constrained_answer(content) if json_schema else content
        if progress is not None:
            progress()
        return answer

    t0 = time.perf_counter()
    with Client(base_url, timeout=120, max_retries=0) as client, ThreadPoolExecutor(workers) as pool:
        preds = list(pool.map(lambda it: ask(client, it), items))
    return summarize(items, preds, time.perf_counter() - t0, KINDS)
