"""Hearing stages 1 and 2 (training/hearing.py): the audio projector aligned, then both worlds' instruction mix.

A batch row is one clip (or one SHAPES image) with `questions_per_item` questions packed after it (packing.py); audio
rows carry each clip's own number of audio slots. Both encoders are frozen and their outputs cached once per
process: the vision tower and projector are the base model's, so only the LM and the audio projector move.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlmserve.model.audio import AudioEncoder
from vlmserve.model.image_config import ImageProcessorConfig
from vlmserve.model.images import ImageProcessor
from vlmserve.model.vlm import VisionLanguageModel
from vlmserve.model.weights import save_model

from . import sounds, world
from .hearing import HEARING_STAGES, HearingRun, train_hear
from .hearing_recipe import HearingRecipe
from .loop import train_loop
from .packing import PackedRows, pack_rows
from .tokenizer import PromptCodec

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 48


class AudioPrompts:
    """Audio-chat token ids as the serving tokenizer writes them: `<s>USER: ` + n audio slots (the prefix), then
    `\\n{question} ASSISTANT:`; answers as PromptCodec writes them (the same template's assistant turn)."""

    def __init__(self, run: HearingRun, codec: PromptCodec) -> None:
        self.chat, self.codec, self.slot = run.chat, codec, run.audio_token_id
        self._cache: dict[str, tuple[list[int], list[int]]] = {}

    def _split(self, question: str) -> tuple[list[int], list[int]]:
        if question not in self._cache:
            msgs = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": question}]}]
            enc = self.chat.encode_chat(msgs, num_image_tokens=0, num_audio_tokens=[1])
            (span,) = enc.audio_spans
            self._cache[question] = enc.input_ids[: span.start], enc.input_ids[span.start + 1 :]
        return self._cache[question]

    def prefix(self, n_tokens: int) -> list[int]:
        head, _ = self._split("Describe the sound.")
        return head + [self.slot] * n_tokens

    def segment(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        return self._split(question)[1], self.codec.answer(answer)


class Caches:
    """The frozen encoders' outputs: audio states (N, T, Da) of the `lm` clip pool, SHAPES features (N, P, Dv)."""

    def __init__(self, run: HearingRun, model: VisionLanguageModel, *, images: bool) -> None:
        self.run = run
        encoder = AudioEncoder(run.encoder_config)
        encoder.load_state_dict(torch.load(run.dir / "hear.pt", weights_only=True))
        self.encoder = encoder.eval()
        self.clips = run.audio_pool("lm")
        self.audio = self.encode(self.clips)  # (N, T, Da)
        self.tokens = [run.encoder_config.num_tokens(f) for f in self.clips.frames]
        self.images: world.Pool | None = None
        self.vision: torch.Tensor | None = None
        if images:
            processor = ImageProcessor(ImageProcessorConfig.clip(model.config.vision.image_size))  # type: ignore[union-attr]
            grid = model.config.vision.image_size // model.config.vision.patch_size  # type: ignore[union-attr]
            t0 = time.perf_counter()
            self.images = world.render_pool(run.recipe.image_pool, run.recipe.seed * 1000 + 22, processor, grid)
            with torch.no_grad():
                self.vision = torch.cat([model.select_features(torch.from_numpy(self.images.pixels[i : i + 512]))
                                         for i in range(0, len(self.images), 512)])  # (N, P, Dv)
            log.info("rendered and encoded %d SHAPES images in %.1fs", len(self.images), time.perf_counter() - t0)

    @torch.no_grad()
    def encode(self, pool: Any) -> torch.Tensor:
        frames = torch.tensor(pool.frames)
        return torch.cat([self.encoder(pool.features[i : i + 256].float(), frames[i : i + 256])
                          for i in range(0, len(pool), 256)])  # (N, T, Da)


def mixed_batch(run: HearingRun, prompts: AudioPrompts, caches: Caches, stage: str, step: int, rows: int,
                per_item: int, audio_share: float, sound_weights: dict[str, float],
                shape_weights: dict[str, float]) -> tuple[list[int], list[int], PackedRows]:
    """(image pool indices, clip pool indices, packed rows): each row one item and `per_item` questions about it."""
    rng = run.step_rng(stage, step)
    codec = prompts.codec
    n_prefix = codec.prompt("Describe the image.").index(codec.image_token_id) + codec.num_image_tokens
    image_prefix = codec.prompt("Describe the image.")[:n_prefix]
    images, clips, prefixes, segments = [], [], [], []
    for _ in range(rows):
        if caches.images is None or rng.random() < audio_share:
            i = rng.randrange(len(caches.clips))
            qs = sounds.sample_questions([caches.clips.clips[i]] * per_item, rng, sound_weights)
            clips.append(i)
            prefixes.append(prompts.prefix(caches.tokens[i]))
            segments.append([prompts.segment(q, a) for _, _, q, a in qs])
        else:
            i = rng.randrange(len(caches.images))
            qs = world.sample_questions([caches.images.worlds[i]] * per_item, rng, shape_weights)
            images.append(i)
            prefixes.append(image_prefix)
            segments.append([(codec.prompt(q)[n_prefix:], codec.answer(a)) for _, _, q, a in qs])
    # both lists are in row order, as merge_at_placeholders and mixed_logits fill the slots
    return images, clips, pack_rows(prefixes, segments, codec.pad_id)


def mixed_logits(model: VisionLanguageModel, batch: PackedRows, vision: torch.Tensor | None,
                 audio: torch.Tensor | None, audio_tokens: list[int]) -> torch.Tensor:
    """Logits (B, T, V) of packed rows with visual tokens at image slots and audio tokens at audio slots, in row
    order; vision (Ni, P, Dv) features, audio (Na, T, Da) encoder states of the rows' items."""
    ids, positions, mask, _ = batch
    embeds = model.embed_tokens(ids)  # (B, T, D)
    if vision is not None and len(vision):
        embeds = model.merge_at_placeholders(ids, embeds, model.project(vision))  # (B, T, D)
    if audio is not None and len(audio):
        assert model.audio is not None
        projected = model.audio.multi_modal_projector(audio)  # (Na, T, D)
        flat = torch.cat([p[:n] for p, n in zip(projected, audio_tokens, strict=True)])  # (sum n, D)
        slots = torch.eq(ids, model.audio.config.audio_token_index)  # (B, T)
        if int(slots.sum()) != len(flat):
            raise ValueError(f"{int(slots.sum())} audio slots for {len(flat)} audio tokens")
        embeds = embeds.masked_scatter(slots[..., None], flat.to(embeds.dtype))  # (B, T, D)
    logits: torch.Tensor = model.language_model(inputs_embeds=embeds, positions=positions, mask=mask)  # (B, T, V)
    return logits


def _loss(model: VisionLanguageModel, caches: Caches, batch_out: tuple[list[int], list[int], PackedRows]
          ) -> torch.Tensor:
    images, clips, batch = batch_out
    vision = caches.vision[images] if caches.vision is not None and images else None
    logits = mixed_logits(model, batch, vision, caches.audio[clips] if clips else None,
                          [caches.tokens[i] for i in clips])
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[3].flatten(), ignore_index=-100)


def _setup(run: HearingRun, *previous: str) -> tuple[VisionLanguageModel, AudioPrompts]:
    model = run.model()
    for name in previous:
        state = torch.load(run.dir / f"{name}.pt", weights_only=True)
        _, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"{name}.pt holds unexpected tensors: {unexpected[:5]}")
    return model, AudioPrompts(run, PromptCodec(run.chat, model.config.num_visual_tokens))


def train_hear_align(run: HearingRun) -> dict[str, Any]:
    """Only the audio projector learns, on captions; the encoder and the LM stay frozen."""
    model, prompts = _setup(run)
    assert model.audio is not None
    model.requires_grad_(False)
    model.eval()
    model.audio.multi_modal_projector.requires_grad_(True)
    caches = run._cache.setdefault("caches_audio", Caches(run, model, images=False))
    budget = run.recipe.align

    def step(i: int) -> tuple[torch.Tensor, int]:
        out = mixed_batch(run, prompts, caches, "hear-align", i, budget.batch, 1, 1.0, {"caption": 1.0}, {})
        return _loss(model, caches, out), budget.batch

    params = [{"params": list(model.audio.multi_modal_projector.parameters())}]
    out = train_loop("hear-align", run.dir, {"projector": model.audio.multi_modal_projector}, params, budget, step,
                     resume=run.resume)
    state = {f"audio.multi_modal_projector.{k}": v for k, v in model.audio.multi_modal_projector.state_dict().items()}
    torch.save(state, run.dir / "hear-align.pt")
    return out


def train_hear_instruct(run: HearingRun) -> dict[str, Any]:
    """Audio projector + LM on both worlds' question mixes, loss on answer tokens; encoders frozen (cached)."""
    model, prompts = _setup(run, "hear-align")
    assert model.audio is not None
    model.requires_grad_(False)
    model.audio.multi_modal_projector.requires_grad_(True)
    model.language_model.requires_grad_(True)
    caches = Caches(run, model, images=True)
    r, budget = run.recipe, run.recipe.instruct

    def step(i: int) -> tuple[torch.Tensor, int]:
        out = mixed_batch(run, prompts, caches, "hear-instruct", i, budget.batch, r.questions_per_item,
                          r.audio_share, r.sound_weights, r.shape_weights)
        return _loss(model, caches, out), budget.batch * r.questions_per_item

    params = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    modules = {"projector": model.audio.multi_modal_projector, "lm": model.language_model}
    out = train_loop("hear-instruct", run.dir, modules, params, budget, step, resume=run.resume)
    state = {k: v for k, v in model.state_dict().items()
             if k.startswith(("language_model.", "audio.multi_modal_projector."))}
    torch.save(state, run.dir / "hear-instruct.pt")
    out["heldout_exact_match"] = heldout_exact_match(run, model, prompts, caches)
    log.info("hear-instruct: held-out exact match %s", out["heldout_exact_match"])
    export(run, run.dir / "model")
    return out


@torch.no_grad()
def heldout_exact_match(run: HearingRun, model: VisionLanguageModel, prompts: AudioPrompts, caches: Caches
                        ) -> dict[str, float]:
    """Per kind, the share of held-out questions (training renderers, unseen clips and images) whose every answer
    token, and its end, is the argmax under teacher forcing: exactly what greedy decoding answers."""
    rng = random.Random(f"{run.recipe.seed}/heldout")
    held = run.audio_pool("heldout")
    n = len(held)
    held_states = caches.encode(held)  # (N, T, Da)
    hits: dict[str, list[bool]] = defaultdict(list)
    model.eval()
    for start in range(0, n, 64):
        idx = list(range(start, min(n, len(held), start + 64)))
        kinds = [sounds.QUESTION_KINDS[i % len(sounds.QUESTION_KINDS)] for i in idx]
        segs, prefixes, tokens, names = [], [], [], []
        for i, kind in zip(idx, kinds, strict=True):
            qa = sounds.question_for(held.clips[i], kind, rng)
            if qa is None:
                kind, qa = "count", sounds.question_for(held.clips[i], "count", rng)
            assert qa is not None
            n_tok = run.encoder_config.num_tokens(held.frames[i])
            prefixes.append(prompts.prefix(n_tok))
            segs.append([prompts.segment(*qa)])
            tokens.append(n_tok)
            names.append(f"sounds/{kind}")
        batch = pack_rows(prefixes, segs, prompts.codec.pad_id)
        logits = mixed_logits(model, batch, None, held_states[idx], tokens)  # (B, T, V)
        target = batch[3]  # (B, T - 1)
        right = (logits[:, :-1].argmax(-1) == target) | (target == -100)  # (B, T - 1)
        for name, ok in zip(names, right.all(-1).tolist(), strict=True):
            hits[name].append(bool(ok))
    if caches.images is not None:
        _shapes_exact_match(run, model, prompts, hits, n // 2)
    model.train()
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(hits.items())}


def _shapes_exact_match(run: HearingRun, model: VisionLanguageModel, prompts: AudioPrompts,
                        hits: dict[str, list[bool]], n: int) -> None:
    """The same measure on held-out SHAPES images (the base's frozen encoder): what the hearing costs the sight."""
    vision = model.config.vision
    assert vision is not None
    processor = ImageProcessor(ImageProcessorConfig.clip(vision.image_size))  # type: ignore[union-attr]
    pool = world.render_pool(n, run.recipe.seed * 1000 + 23, processor, vision.image_size // vision.patch_size)  # type: ignore[union-attr]
    rng = random.Random(f"{run.recipe.seed}/heldout-shapes")
    codec = prompts.codec
    n_prefix = codec.prompt("Describe the image.").index(codec.image_token_id) + codec.num_image_tokens
    for start in range(0, n, 64):
        idx = list(range(start, min(n, start + 64)))
        segs, names = [], []
        for i in idx:
            kind = world.KINDS[i % len(world.KINDS)]
            qa = world.question_for(pool.worlds[i], kind, rng)
            if qa is None:
                kind, qa = "count", world.question_for(pool.worlds[i], "count", rng)
            assert qa is not None
            segs.append([(codec.prompt(qa[0])[n_prefix:], codec.answer(qa[1]))])
            names.append(f"shapes/{kind}")
        batch = pack_rows(codec.prompt("Describe the image.")[:n_prefix], segs, codec.pad_id)
        feats = model.select_features(torch.from_numpy(pool.pixels[idx]))  # (B, P, Dv)
        logits = mixed_logits(model, batch, feats, None, [])  # (B, T, V)
        target = batch[3]  # (B, T - 1)
        right = (logits[:, :-1].argmax(-1) == target) | (target == -100)  # (B, T - 1)
        for name, ok in zip(names, right.all(-1).tolist(), strict=True):
            hits[name].append(bool(ok))


def export(run: HearingRun, out: Path, dtype: torch.dtype = torch.float16) -> Path:
    """The LLaVA directory (grown tables, the template placing clips) with the audio tower in `audio/`."""
    model, _ = _setup(run, "hear-align", "hear-instruct")
    assert model.audio is not None
    model.audio.audio_tower.load_state_dict(torch.load(run.dir / "hear.pt", weights_only=True))
    save_model(model.eval(), out, dtype=dtype, copy_from=run.text_dir)
    generation = json.loads((out / "generation_config.json").read_text())
    # the longest SOUNDS caption is 27 tokens of a tokenizer that never saw its words: the default must reach it
    generation["max_new_tokens"] = max(int(generation.get("max_new_tokens", 0)), MAX_NEW_TOKENS)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    log.info("exported the hearing model to %s", out)
    return out


TRAINERS = {"hear": train_hear, "hear-align": train_hear_align, "hear-instruct": train_hear_instruct}


def run_hearing(recipe: HearingRecipe, out: Path, stages: list[str], *, resume: bool = True) -> dict[str, Any]:
    """Run the given hearing stages in order; a finished stage is skipped when resuming."""
    run = HearingRun(recipe, out, resume=resume)
    for stage in stages:
        if stage not in HEARING_STAGES:
            raise ValueError(f"unknown hearing stage {stage!r}; stages: {HEARING_STAGES}")
        done = run.dir / f"{stage}.pt"
        if resume and done.is_file() and f"stage_{stage}" in run.summary:
            log.info("stage %s already done (%s); skipping", stage, done)
            continue
        t0 = time.perf_counter()
        result = TRAINERS[stage](run)
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        log.info("stage %s: done in %.1fs", stage, result["wall_s"])
        run.record(f"stage_{stage}", result)
    return run.summary
