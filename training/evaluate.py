"""Evaluation on the independent renderer (`training/eval_world.py`): per-kind exact match through our greedy
`generate`, or through a running server's OpenAI-compatible HTTP API; plus the projector study's measurements.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from vlmserve.model.generation import generate
from vlmserve.model.image_decode import open_image
from vlmserve.model.images import ImageProcessor
from vlmserve.model.tokenizer import ChatTokenizer
from vlmserve.model.vlm import VisionLanguageModel
from vlmserve.model.weights import load_model

from .eval_world import COLORS as EVAL_COLORS
from .eval_world import COUNT_WORDS, KINDS, EvalItem, Graded, grade, make_eval_set, score
from .eval_world import SHAPES as EVAL_SHAPES
from .world import COLORS, PAIRS, render_pool

if TYPE_CHECKING:
    from vlmserve.server.engine import EngineConfig, EngineRequest
    from vlmserve.server.settings import Settings

    from .stages import Run

log = logging.getLogger(__name__)

MAX_PIXELS = 4096 * 4096
MAX_TOKENS = 24
MAX_MISTAKES = 20


def _messages(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


class LocalAnswerer:
    """Answers questions with a checkpoint directory loaded by vlmserve, greedy, one request at a time."""

    def __init__(self, model_dir: str | Path, *, model: VisionLanguageModel | None = None) -> None:
        self.model = model if model is not None else load_model(model_dir)
        self.chat = ChatTokenizer.from_pretrained(model_dir)
        self.processor = ImageProcessor.from_pretrained(model_dir)

    def __call__(self, image: bytes, question: str, max_new_tokens: int = MAX_TOKENS) -> str:
        pixels = self.processor([open_image(image, max_pixels=MAX_PIXELS)])  # (1, 3, H, W)
        ids = self.chat.encode_chat(
            _messages(question), num_image_tokens=self.model.config.num_visual_tokens
        ).input_ids
        out = list(generate(self.model, ids, pixel_values=pixels, max_new_tokens=max_new_tokens,
                            eos_token_ids=self.chat.eos_token_ids))
        return self.chat.decode(out, skip_special_tokens=True).strip()


def evaluate_local(model_dir: str | Path, items: Sequence[EvalItem], *, log_every: int = 100) -> dict[str, Any]:
    """Score a checkpoint directory on `items` through vlmserve's generate; adds per-item mistakes (first 20)."""
    answer = LocalAnswerer(model_dir)
    preds: list[str] = []
    t0 = time.perf_counter()
    for i, item in enumerate(items, start=1):
        preds.append(answer(item.image, item.question))
        if i % log_every == 0:
            log.info("eval %d/%d (%.1f q/s)", i, len(items), i / (time.perf_counter() - t0))
    return summarize(items, preds, time.perf_counter() - t0)


def serving_settings(model_dir: str | Path, max_running: int = 16) -> Settings:
    """The settings `vlmserve serve` would run the checkpoint with (its defaults and VLMSERVE_* environment
    variables, e.g. VLMSERVE_COMPILE=false), with `max_running` rows and 4x that many waiting."""
    from vlmserve.server.settings import Settings

    return Settings(model=str(model_dir), max_running=max_running, max_waiting=4 * max_running)


def engine_answers(model: VisionLanguageModel, chat: ChatTokenizer, model_id: str, requests: Iterable[EngineRequest],
                   config: EngineConfig, *, progress: Callable[[], None] | None = None) -> list[str]:
    """Each request's answer (stripped text), in the order given, through the serving engine (continuous batching)
    run with `config`: the requests are built as the engine asks for more, at most `config.max_waiting` in flight,
    so a long set never sits in memory whole. A failed request raises RuntimeError. `progress` is called once per
    answer."""
    import queue as queue_mod

    from vlmserve.server.engine import Engine, Failed, Finished

    window = config.max_waiting
    engine = Engine(model, chat, config, model_id=model_id).start()
    done: queue_mod.Queue[Finished | Failed] = queue_mod.Queue()
    order: dict[str, int] = {}
    preds: list[str] = []
    pending = iter(requests)

    def submit_next() -> bool:
        req = next(pending, None)
        if req is None:
            return False
        order[req.request_id] = len(preds)
        preds.append("")
        engine.submit(req, lambda e: done.put(e) if isinstance(e, Finished | Failed) else None)
        return True

    try:
        in_flight = sum(submit_next() for _ in range(window))
        while in_flight:
            event = done.get(timeout=600)
            if isinstance(event, Failed):
                raise RuntimeError(f"eval request {event.request_id} failed: {event.error}")
            preds[order[event.request_id]] = event.text.strip()
            if progress is not None:
                progress()
            in_flight += submit_next() - 1
    finally:
        engine.shutdown(timeout=5)
    return preds


def evaluate_engine(model_dir: str | Path, items: Sequence[EvalItem], *, max_running: int = 16,
                    progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """Score a checkpoint directory on `items` through the serving engine (continuous batching, greedy): the same
    code path as the server, without HTTP. `progress` is called once per answered question."""
    from vlmserve.model.sampling import SamplingParams
    from vlmserve.server.engine import ImageLimits
    from vlmserve.server.engine.prepare import RequestPreparer

    model = load_model(model_dir)
    chat = ChatTokenizer.from_pretrained(model_dir)
    preparer = RequestPreparer(chat, ImageProcessor.from_pretrained(model_dir), model.config.num_visual_tokens,
                               ImageLimits(max_image_pixels=MAX_PIXELS))
    requests = (preparer.request(str(i), _messages(item.question), [item.image],
                                 sampling=SamplingParams(temperature=0.0), max_tokens=MAX_TOKENS)
                for i, item in enumerate(items))
    t0 = time.perf_counter()
    config = serving_settings(model_dir, max_running).engine_config()
    preds = engine_answers(model, chat, Path(model_dir).name, requests, config, progress=progress)
    return summarize(items, preds, time.perf_counter() - t0)


def answer_schema(kind: str) -> dict[str, Any]:
    """The JSON schema of a question kind's answers: an enum, or for captions the pattern every caption follows."""
    if kind == "color":
        return {"enum": list(EVAL_COLORS)}
    if kind == "shape":
        return {"enum": list(EVAL_SHAPES)}
    if kind == "count":
        return {"enum": list(COUNT_WORDS.values())}
    if kind == "exists":
        return {"enum": ["yes", "no"]}
    thing = f"a ({'|'.join(EVAL_COLORS)}) ({'|'.join(EVAL_SHAPES)})"
    return {"type": "string", "pattern": f"^{thing}(( and {thing})|(, {thing} and {thing}))?$"}


def evaluate_url(base_url: str, items: Sequence[EvalItem], *, model: str | None = None, workers: int = 8,
                 json_schema: bool = False, progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """Score a running server on `items` through POST {base}/v1/chat/completions (temperature 0, max_tokens 24).
    With `json_schema`, each answer is constrained by `response_format` to its kind's `answer_schema` (a JSON
    string) and graded as the string it holds. An error answer raises the client's `VlmserveError`. `progress` is
    called once per answered question."""
    from vlmserve_client import Client

    def ask(client: Client, item: EvalItem) -> str:
        schema = {"name": item.kind, "schema": answer_schema(item.kind)}
        response_format = {"type": "json_schema", "json_schema": schema} if json_schema else None
        content = client.chat(item.question, images=[item.image], model=model, temperature=0, max_tokens=MAX_TOKENS,
                              response_format=response_format).text
        return constrained_answer(content) if json_schema else content

    def counted(client: Client, item: EvalItem) -> str:
        answer = ask(client, item)
        if progress is not None:
            progress()
        return answer

    t0 = time.perf_counter()
    with Client(base_url, timeout=120, max_retries=0) as client, ThreadPoolExecutor(workers) as pool:
        preds = list(pool.map(lambda it: counted(client, it), items))
    return summarize(items, preds, time.perf_counter() - t0)


def constrained_answer(content: str) -> str:
    """The string a `response_format` JSON answer holds; the text as it is when it is not a JSON string (cut short
    by max_tokens: graded as it is, wrong)."""
    try:
        answer = json.loads(content)
    except ValueError:
        return content
    return answer if isinstance(answer, str) else content


class Asked(Graded, Protocol):
    """What a result reports of an item: its kind, question and answer (either world's items)."""

    @property
    def question(self) -> str: ...


def summarize(items: Sequence[Asked], preds: Sequence[str], seconds: float, kinds: Sequence[str] = KINDS
              ) -> dict[str, Any]:
    """`score` (over the world's question `kinds`), the seconds taken and the first 20 mistakes."""
    result = score(items, preds, kinds)
    result["seconds"] = round(seconds, 1)
    result["mistakes"] = [
        {"kind": it.kind, "question": it.question, "answer": it.answer, "got": p}
        for it, p in zip(items, preds, strict=True)
        if not grade(p, it.answer)
    ][:MAX_MISTAKES]
    return result


def eval_items(n: int, seed: int) -> list[EvalItem]:
    """The independent renderer's question set (kinds balanced)."""
    return make_eval_set(n, seed)


# ------------------------------------------------------------------------------------------ projector study


@torch.no_grad()
def color_alignment(model: VisionLanguageModel, run: Run, n_images: int = 200) -> float:
    """How often the colour word whose input embedding is nearest (cosine) to an object's mean projected visual
    token is that object's colour. Per-patch projectors: the mean over the patches the object covers; the resampler
    (no patch correspondence): the mean of all visual tokens, on one-object images only."""
    pool = render_pool(n_images, run.recipe.seed * 1000 + 9, run.processor, run.grid)
    visual = model.encode_images(torch.from_numpy(pool.pixels))  # (N, N_vis, D)
    words = torch.stack([model.language_model.embed_tokens.weight[run.codec.answer(c)[0]] for c in COLORS])  # (6, D)
    words = torch.nn.functional.normalize(words, dim=-1)
    per_patch = visual.shape[1] == run.grid * run.grid
    hits, total = 0, 0
    for i, world in enumerate(pool.worlds):
        pair_map = torch.from_numpy(pool.labels[i, 0]).flatten()  # (P,)
        for obj in world.shapes:
            if per_patch:
                mask = pair_map == PAIRS.index((obj.color, obj.shape)) + 1  # (P,)
                if not mask.any():
                    continue
                token = visual[i, mask].mean(0)  # (D,)
            elif len(world.shapes) == 1:
                token = visual[i].mean(0)  # (D,)
            else:
                continue
            best = int((words @ torch.nn.functional.normalize(token, dim=0)).argmax())
            hits += COLORS[best] == obj.color
            total += 1
    return hits / max(1, total)


@torch.inference_mode()
def prefill_latency_ms(model: VisionLanguageModel, chat: ChatTokenizer, image_size: int, repeats: int = 30) -> float:
    """Median milliseconds of one image + question forward (encoder, projector, LM prefill) on CPU."""
    ids = chat.encode_chat(_messages("What color is the circle?"),
                           num_image_tokens=model.config.num_visual_tokens).input_ids
    x = torch.tensor([ids])  # (1, T)
    px = torch.randn(1, 3, image_size, image_size)  # (1, 3, H, W)
    times = []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        model(x, pixel_values=px)
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def projector_params(model: VisionLanguageModel) -> int:
    return sum(p.numel() for p in model.multi_modal_projector.parameters())
