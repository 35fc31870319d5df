"""The four LLaVA-style stages, each a resumable run writing its result into the run directory:

0. `vision`   CLIP ViT pretrained on the world with dense per-patch labels       -> vision.pt
1. `lm`       Llama LM pretrained on the world's chat text (image slots absent)   -> lm.pt
2. `align`    encoder + LM frozen, the projector trained on captioning            -> align.pt
3. `instruct` projector + LM on the whole question mix (answer tokens only)       -> instruct.pt, then model/
4. `finetune` (optional, `recipe.finetune`) stage 3 continued with the encoder unfrozen at a low rate, on fresh
   images rendered every step                                                    -> finetune.pt, then model/
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlmserve.model.config import VisionConfig
from vlmserve.model.image_config import ImageProcessorConfig
from vlmserve.model.images import ImageProcessor
from vlmserve.model.text import TextModel
from vlmserve.model.tokenizer import ChatTokenizer
from vlmserve.model.vision import VisionTransformer
from vlmserve.model.vlm import VisionLanguageModel
from vlmserve.model.weights import save_model

from .heads import PatchHeads
from .loop import train_loop
from .packing import PackedRows, pack_rows, packed_loss
from .recipe import Recipe
from .tokenizer import PromptCodec, save_text_side, train_tokenizer
from .world import KINDS, Pool, random_world, render, render_pool, sample_questions

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("vision", "lm", "align", "instruct", "finetune")


@dataclass
class Run:
    """A run directory with its recipe, tokenizer, processor and (lazily rendered) pools."""

    recipe: Recipe
    dir: Path
    resume: bool = True
    _pools: dict[str, Pool] = field(default_factory=dict)
    _features: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        saved = self.dir / "recipe.json"
        if saved.is_file() and self.resume and json.loads(saved.read_text()) != json.loads(self.recipe.to_json()):
            log.warning("%s was started with another recipe; finished stages are kept, the rest use this one", self.dir)
        saved.write_text(self.recipe.to_json())
        self.text_dir = self.dir / "text"
        if not (self.text_dir / "tokenizer.json").is_file():
            tokenizer = train_tokenizer(self.recipe.vocab_size, self.recipe.seed)
            save_text_side(self.text_dir, tokenizer, image_size=self.recipe.image_size,
                           patch_size=self.recipe.patch_size)
        self.chat = ChatTokenizer.from_pretrained(self.text_dir)
        tok = self.chat.tokenizer
        self.config = self.recipe.vlm_config(
            vocab_size=len(tok), image_token_index=int(self.chat.image_token_id),  # type: ignore[arg-type]
            bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id,
        )
        self.codec = PromptCodec(self.chat, self.config.num_visual_tokens)
        self.processor = ImageProcessor(ImageProcessorConfig.clip(self.recipe.image_size))
        self.grid = self.recipe.image_size // self.recipe.patch_size
        self.summary_path = self.dir / "summary.json"
        self.summary: dict[str, Any] = json.loads(self.summary_path.read_text()) if self.summary_path.is_file() else {}

    def pool(self, which: str) -> Pool:
        """The `vision` pool (stage 0) or the `lm` pool (stages 2-3), rendered once per process."""
        if which not in self._pools:
            n = self.recipe.vision_pool if which == "vision" else self.recipe.lm_pool
            seed = self.recipe.seed * 1000 + (1 if which == "vision" else 2)
            t0 = time.perf_counter()
            self._pools[which] = render_pool(n, seed, self.processor, self.grid)
            log.info("rendered the %s pool: %d images in %.1fs", which, n, time.perf_counter() - t0)
            self.record(f"render_{which}_s", round(time.perf_counter() - t0, 1))
        return self._pools[which]

    def record(self, key: str, value: object) -> None:
        self.summary[key] = value
        self.summary_path.write_text(json.dumps(self.summary, indent=2))

    def model(self) -> VisionLanguageModel:
        torch.manual_seed(self.recipe.seed)
        return VisionLanguageModel(self.config)

    def step_rng(self, stage: str, step: int) -> random.Random:
        """Batch randomness from (seed, stage, step) alone, so that a resumed run sees the same batches."""
        return random.Random(f"{self.recipe.seed}/{stage}/{step}")


# ---------------------------------------------------------------------------------------------------- stage 0


def train_vision(run: Run) -> dict[str, Any]:
    """Pretrain the ViT to label every patch (pair, colour, shape, left-to-right rank, object count)."""
    torch.manual_seed(run.recipe.seed)
    if not isinstance(run.config.vision, VisionConfig):
        raise ValueError("the training pipeline trains the llava layout's ViT")
    tower = VisionTransformer(run.config.vision)
    heads = PatchHeads(dim=run.config.vision.hidden_size)
    pool = run.pool("vision")
    pixels, labels = torch.from_numpy(pool.pixels), torch.from_numpy(pool.labels)
    budget = run.recipe.vision
    layer = run.config.feature_layers

    def step(i: int) -> tuple[torch.Tensor, int]:
        idx = torch.tensor(run.step_rng("vision", i).sample(range(len(pool)), budget.batch))
        states = tower(pixels[idx], layer)[0]  # (B, 1 + P, D)
        loss, _ = heads.loss(states, labels[idx])
        return loss, budget.batch

    params = [{"params": [*tower.parameters(), *heads.parameters()]}]
    out = train_loop("vision", run.dir, {"tower": tower, "heads": heads}, params, budget, step, resume=run.resume)
    out["heldout_patch_accuracy"] = _heldout_patch_accuracy(run, tower, heads)
    log.info("vision: held-out patch accuracy %s", out["heldout_patch_accuracy"])
    torch.save(tower.state_dict(), run.dir / "vision.pt")
    return out


@torch.no_grad()
def _heldout_patch_accuracy(run: Run, tower: VisionTransformer, heads: PatchHeads) -> dict[str, float]:
    pool = render_pool(256, run.recipe.seed * 1000 + 7, run.processor, run.grid)
    states = tower(torch.from_numpy(pool.pixels), run.config.feature_layers)[0]  # (N, 1 + P, D)
    _, acc = heads.loss(states, torch.from_numpy(pool.labels))
    return {k: round(v, 4) for k, v in acc.items()}


# ---------------------------------------------------------------------------------------------------- stage 1


def _pad(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # (B, T)


def train_lm(run: Run) -> dict[str, Any]:
    """Pretrain the LM on chat-formatted questions and answers about random scenes, without image slots."""
    torch.manual_seed(run.recipe.seed)
    lm = TextModel(run.config.text)
    codec, budget = run.codec, run.recipe.lm
    weights = dict.fromkeys(KINDS, 1.0)

    def step(i: int) -> tuple[torch.Tensor, int]:
        rng = run.step_rng("lm", i)
        worlds = [random_world(rng) for _ in range(budget.batch)]
        rows = []
        for _, _, q, a in sample_questions(worlds, rng, weights):
            rows.append([t for t in codec.prompt(q) if t != codec.image_token_id] + codec.answer(a))
        ids = _pad(rows, codec.pad_id)  # (B, T)
        logits = lm(ids)  # (B, T, V)
        target = ids[:, 1:].masked_fill(ids[:, 1:] == codec.pad_id, -100)  # (B, T - 1)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100)
        return loss, budget.batch

    out = train_loop("lm", run.dir, {"lm": lm}, [{"params": list(lm.parameters())}], budget, step, resume=run.resume)
    torch.save(lm.state_dict(), run.dir / "lm.pt")
    return out


# ------------------------------------------------------------------------------------------------ stages 2, 3


def _load_previous(run: Run, model: VisionLanguageModel, *names: str) -> None:
    for name in names:
        path = run.dir / f"{name}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run stage {name!r} first")
        state = torch.load(path, weights_only=True)
        if name == "vision":
            model.vision_tower.load_state_dict(state)
        elif name == "lm":
            model.language_model.load_state_dict(state, strict=False)
        else:
            model.load_state_dict(state, strict=False)


@torch.no_grad()
def _pool_features(run: Run, model: VisionLanguageModel) -> torch.Tensor:
    """The frozen encoder's selected features of every `lm` pool image (computed once per process)."""
    if run._features is None:
        pool = run.pool("lm")
        t0 = time.perf_counter()
        chunks = [
            model.select_features(torch.from_numpy(pool.pixels[i : i + 512])) for i in range(0, len(pool), 512)
        ]  # each (n, P, Dv)
        run._features = torch.cat(chunks)  # (N, P, Dv)
        log.info("encoded %d pool images in %.1fs", len(pool), time.perf_counter() - t0)
    return run._features


def answer_batch(
    run: Run, stage: str, step: int, batch: int, weights: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pool indices (B,), input ids (B, T), targets (B, T - 1) with -100 outside the answers)."""
    rng = run.step_rng(stage, step)
    pool = run.pool("lm")
    idx = rng.sample(range(len(pool)), batch)
    qs = sample_questions([pool.worlds[i] for i in idx], rng, weights)
    rows, starts = [], []
    for _, _, q, a in qs:
        prompt = run.codec.prompt(q)
        rows.append(prompt + run.codec.answer(a))
        starts.append(len(prompt))
    ids = _pad(rows, run.codec.pad_id)  # (B, T)
    target = torch.full((ids.shape[0], ids.shape[1] - 1), -100)  # (B, T - 1)
    for b, (row, s) in enumerate(zip(rows, starts, strict=True)):
        target[b, s - 1 : len(row) - 1] = torch.tensor(row[s:])
    return torch.tensor(idx), ids, target


def _answer_loss(
    model: VisionLanguageModel, feats: torch.Tensor, ids: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy over the answer tokens; feats (B, P, Dv), ids (B, T), target (B, T - 1)."""
    logits = model(ids, vision_features=feats)  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100)


def train_align(run: Run) -> dict[str, Any]:
    """Only the projector learns, on captions; encoder and LM stay frozen."""
    model = run.model()
    _load_previous(run, model, "vision", "lm")
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    feats_all = _pool_features(run, model)
    budget = run.recipe.align

    def step(i: int) -> tuple[torch.Tensor, int]:
        idx, ids, target = answer_batch(run, "align", i, budget.batch, {"caption": 1.0})
        return _answer_loss(model, feats_all[idx], ids, target), budget.batch

    model.eval()
    params = [{"params": list(model.multi_modal_projector.parameters())}]
    out = train_loop("align", run.dir, {"projector": model.multi_modal_projector}, params, budget, step,
                     resume=run.resume)
    state = {f"multi_modal_projector.{k}": v for k, v in model.multi_modal_projector.state_dict().items()}
    torch.save(state, run.dir / "align.pt")
    from .evaluate import color_alignment

    out["color_alignment"] = color_alignment(model, run)
    log.info("align: colour alignment %.3f", out["color_alignment"])
    return out


def packed_batch(run: Run, stage: str, step: int, images: int, per_image: int, weights: dict[str, float]
                 ) -> tuple[torch.Tensor, PackedRows]:
    """(pool indices (B,), packed rows): `per_image` questions about each of `images` pool images, see packing.py."""
    rng = run.step_rng(stage, step)
    pool = run.pool("lm")
    idx = rng.sample(range(len(pool)), images)
    n_prefix = run.codec.prompt("Describe the image.").index(run.codec.image_token_id) + run.codec.num_image_tokens
    prefix = run.codec.prompt("Describe the image.")[:n_prefix]
    segments = []
    for i in idx:
        qs = sample_questions([pool.worlds[i]] * per_image, rng, weights)
        segs = []
        for _, _, q, a in qs:
            prompt = run.codec.prompt(q)
            if prompt[:n_prefix] != prefix:
                raise ValueError("prompts do not share the image prefix; packing needs the image first")
            segs.append((prompt[n_prefix:], run.codec.answer(a)))
        segments.append(segs)
    return torch.tensor(idx), pack_rows(prefix, segments, run.codec.pad_id)


def train_instruct(run: Run) -> dict[str, Any]:
    """Projector + LM on the whole question mix, loss on answer tokens; the encoder stays frozen (cached features).

    Each row packs `questions_per_image` questions about one image (packing.py): same gradients per question as lone
    sequences, the image prefix computed once per row."""
    model = run.model()
    _load_previous(run, model, "vision", "lm", "align")
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    model.language_model.requires_grad_(True)
    feats_all = _pool_features(run, model)
    budget = run.recipe.instruct
    weights = run.recipe.kind_weights
    per_image = run.recipe.questions_per_image

    def step(i: int) -> tuple[torch.Tensor, int]:
        idx, batch = packed_batch(run, "instruct", i, budget.batch, per_image, weights)
        return packed_loss(model, batch, feats_all[idx]), budget.batch * per_image

    params = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    modules = {"projector": model.multi_modal_projector, "lm": model.language_model}
    out = train_loop("instruct", run.dir, modules, params, budget, step, resume=run.resume)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_tower.")}
    torch.save(state, run.dir / "instruct.pt")
    export(run, run.dir / "model")
    return out


def fresh_packed_batch(run: Run, stage: str, step: int, images: int, per_image: int, weights: dict[str, float],
                       object_weights: tuple[float, ...]) -> tuple[torch.Tensor, PackedRows]:
    """(pixels (B, 3, H, W), packed rows) of `images` scenes rendered for this step alone (deterministic per step)."""
    rng = run.step_rng(stage, step)
    worlds = [random_world(rng, rng.choices((1, 2, 3), object_weights)[0]) for _ in range(images)]
    pixels = run.processor([render(w, rng) for w in worlds])  # (B, 3, H, W)
    n_prefix = run.codec.prompt("Describe the image.").index(run.codec.image_token_id) + run.codec.num_image_tokens
    prefix = run.codec.prompt("Describe the image.")[:n_prefix]
    segments = []
    for world in worlds:
        qs = sample_questions([world] * per_image, rng, weights)
        segments.append([(run.codec.prompt(q)[n_prefix:], run.codec.answer(a)) for _, _, q, a in qs])
    return pixels, pack_rows(prefix, segments, run.codec.pad_id)


def train_finetune(run: Run) -> dict[str, Any]:
    """Stage 3 continued with everything trainable: encoder at `unfreeze_vision_lr`, projector + LM at the stage's
    rate; features computed in the loop (no cache), images rendered fresh every step with more 3-object scenes."""
    budget = run.recipe.finetune
    if budget is None:
        log.info("finetune: the recipe has no finetune budget; skipping")
        return {"stage": "finetune", "skipped": True}
    model = run.model()
    _load_previous(run, model, "vision", "instruct")
    model.requires_grad_(True)
    weights, per_image = run.recipe.finetune_kind_weights, run.recipe.questions_per_image

    def step(i: int) -> tuple[torch.Tensor, int]:
        pixels, batch = fresh_packed_batch(run, "finetune", i, budget.batch, per_image, weights,
                                           run.recipe.finetune_object_weights)
        return packed_loss(model, batch, model.select_features(pixels)), budget.batch * per_image

    params: list[dict[str, Any]] = [
        {"params": list(model.vision_tower.parameters()), "lr_scale": run.recipe.unfreeze_vision_lr / budget.lr},
        {"params": [*model.multi_modal_projector.parameters(), *model.language_model.parameters()]},
    ]
    modules = {"vision": model.vision_tower, "projector": model.multi_modal_projector, "lm": model.language_model}
    out = train_loop("finetune", run.dir, modules, params, budget, step, resume=run.resume)
    torch.save(model.state_dict(), run.dir / "finetune.pt")
    export(run, run.dir / "model")
    return out


def final_model(run: Run) -> VisionLanguageModel:
    """The composed model from the stage results (stage 4's when it ran, else stages 0 and 3)."""
    model = run.model()
    if run.recipe.finetune is not None and (run.dir / "finetune.pt").is_file():
        _load_previous(run, model, "finetune")
    else:
        _load_previous(run, model, "vision", "instruct")
    return model.eval()


def export(run: Run, out: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write the LLaVA-format directory: config, safetensors, tokenizer, chat template, processor, generation config."""
    model = final_model(run)
    save_model(model, out, dtype=dtype, copy_from=run.text_dir)
    log.info("exported the model to %s", out)
    return out


TRAINERS = {"vision": train_vision, "lm": train_lm, "align": train_align, "instruct": train_instruct,
            "finetune": train_finetune}


def run_stages(
    recipe: Recipe, out: Path, stages: list[str], *, resume: bool = True, share: Run | None = None
) -> dict[str, Any]:
    """Run the given stages in order; a finished stage (its result file present) is skipped when resuming.

    `share`: a run with the same encoder and `lm` pool whose rendered pools and cached features are reused.
    """
    run = Run(recipe, out, resume=resume)
    if share is not None:
        run._pools, run._features = share._pools, share._features
    results = {"stage_outputs": {"vision": "vision.pt", "lm": "lm.pt", "align": "align.pt",
                                 "instruct": "instruct.pt", "finetune": "finetune.pt"}}
    for stage in stages:
        if stage == "finetune" and recipe.finetune is None:
            continue
        done = run.dir / results["stage_outputs"][stage]
        if resume and done.is_file() and f"stage_{stage}" in run.summary:
            log.info("stage %s already done (%s); skipping", stage, done)
            continue
        if not resume:
            for f in (run.dir / f"{stage}.ckpt", done):
                f.unlink(missing_ok=True)
        t0 = time.perf_counter()
        log.info("stage %s: start", stage)
        result = TRAINERS[stage](run)
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        log.info("stage %s: done in %.1fs", stage, result["wall_s"])
        run.record(f"stage_{stage}", result)
    if share is not None:
        share._pools, share._features = run._pools, run._features
    return run.summary
