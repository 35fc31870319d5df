"""Training recipes: model sizes, data pools and each stage's budget, as typed dataclasses with named presets."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vlmserve.model.config import ProjectorConfig, TextConfig, VisionConfig, VLMConfig


@dataclass(frozen=True)
class StageBudget:
    """Optimisation settings of one stage: steps, batch, peak learning rate, warmup, checkpoint period."""

    steps: int
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0
    checkpoint_every: int = 250
    log_every: int = 50


@dataclass(frozen=True)
class Recipe:
    """Everything one run needs; `config_name` presets below."""

    name: str
    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    vit_hidden: int = 128
    vit_layers: int = 4
    vit_heads: int = 4
    vit_intermediate: int = 512
    lm_hidden: int = 192
    lm_layers: int = 4
    lm_heads: int = 6
    lm_kv_heads: int = 2
    lm_intermediate: int = 512
    vocab_size: int = 384
    feature_layer: int = -1
    projector: str = "mlp"
    resampler_queries: int = 16
    vision_pool: int = 20000  # images for stage 0
    lm_pool: int = 20000  # images for stages 2 and 3 (a separate draw: the LM sees features of unseen images)
    vision: StageBudget = field(default_factory=lambda: StageBudget(steps=1500, batch=64, lr=2e-3, warmup=100))
    lm: StageBudget = field(default_factory=lambda: StageBudget(steps=250, batch=64, lr=2e-3, warmup=50))
    align: StageBudget = field(default_factory=lambda: StageBudget(steps=300, batch=64, lr=2e-3, warmup=30))
    instruct: StageBudget = field(default_factory=lambda: StageBudget(steps=2700, batch=32, lr=1.5e-3, warmup=100))
    questions_per_image: int = 4  # instruct: questions packed per image row (training/packing.py)
    kind_weights: dict[str, float] = field(
        default_factory=lambda: {"color": 0.2, "shape": 0.1, "count": 0.1, "exists": 0.15, "caption": 0.45}
    )
    # stage 4 `finetune` (optional; None = the run ends after `instruct`): continues from stage 3 with the encoder
    # unfrozen at its own peak rate `unfreeze_vision_lr`, on freshly rendered images every step (no pool, no cache)
    finetune: StageBudget | None = None
    unfreeze_vision_lr: float = 1.5e-4
    finetune_kind_weights: dict[str, float] = field(
        default_factory=lambda: {"color": 0.12, "shape": 0.1, "count": 0.08, "exists": 0.15, "caption": 0.55}
    )
    finetune_object_weights: tuple[float, float, float] = (0.2, 0.35, 0.45)  # scenes with 1, 2, 3 objects

    def vlm_config(self, *, vocab_size: int, image_token_index: int, bos: int, eos: int, pad: int) -> VLMConfig:
        """The composed model's config (LLaVA layout) for a tokenizer of `vocab_size`."""
        vision = VisionConfig(
            flavour="clip", hidden_size=self.vit_hidden, intermediate_size=self.vit_intermediate,
            num_hidden_layers=self.vit_layers, num_attention_heads=self.vit_heads, image_size=self.image_size,
            patch_size=self.patch_size,
        )
        text = TextConfig(
            model_type="llama", vocab_size=vocab_size, hidden_size=self.lm_hidden,
            intermediate_size=self.lm_intermediate, num_hidden_layers=self.lm_layers,
            num_attention_heads=self.lm_heads, num_key_value_heads=self.lm_kv_heads, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        )
        projector = ProjectorConfig(kind=self.projector, num_queries=self.resampler_queries)  # type: ignore[arg-type]
        return VLMConfig(
            vision=vision, text=text, projector=projector, image_token_index=image_token_index,
            vision_feature_layer=self.feature_layer, vision_feature_select_strategy="default",
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        d: dict[str, Any] = json.loads(text)
        for stage in ("vision", "lm", "align", "instruct"):
            d[stage] = StageBudget(**d[stage])
        if d.get("finetune") is not None:
            d["finetune"] = StageBudget(**d["finetune"])
        if "finetune_object_weights" in d:
            d["finetune_object_weights"] = tuple(d["finetune_object_weights"])
        return cls(**d)


def _shorter(r: Recipe, projector: str) -> Recipe:
    """The projector study: same stages, a shorter common budget for every variant."""
    return replace(
        r, name=f"table-{projector}", projector=projector, lm_pool=10000,
        align=replace(r.align, steps=100, warmup=10), instruct=replace(r.instruct, steps=250, warmup=30),
    )


SHAPES = Recipe(name="shapes")
# the shipped run plus stage 4: `train --stage finetune --config shapes-finetune --out RUN` continues a finished run
SHAPES_FINETUNE = replace(
    SHAPES, name="shapes-finetune",
    finetune=StageBudget(steps=1900, batch=32, lr=3e-4, warmup=30, checkpoint_every=100, log_every=50),
)
SMOKE = Recipe(
    name="smoke", image_size=32, patch_size=8, vit_hidden=32, vit_layers=2, vit_heads=2, vit_intermediate=64,
    lm_hidden=32, lm_layers=2, lm_heads=2, lm_kv_heads=1, lm_intermediate=64, vision_pool=64, lm_pool=64,
    vision=StageBudget(steps=30, batch=16, lr=3e-3, warmup=2, checkpoint_every=10, log_every=10),
    lm=StageBudget(steps=30, batch=16, lr=3e-3, warmup=2, checkpoint_every=10, log_every=10),
    align=StageBudget(steps=20, batch=16, lr=3e-3, warmup=2, checkpoint_every=10, log_every=10),
    instruct=StageBudget(steps=30, batch=16, lr=3e-3, warmup=2, checkpoint_every=10, log_every=10),
    finetune=StageBudget(steps=6, batch=4, lr=1e-3, warmup=2, checkpoint_every=3, log_every=3),
)
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        SHAPES, SHAPES_FINETUNE, SMOKE, _shorter(SHAPES, "linear"), _shorter(SHAPES, "mlp"),
        _shorter(SHAPES, "resampler"),
    )
}


def get_recipe(name_or_path: str) -> Recipe:
    """A preset by name, or a recipe JSON file."""
    if name_or_path in RECIPES:
        return RECIPES[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        return Recipe.from_json(path.read_text())
    raise ValueError(f"unknown recipe {name_or_path!r}; presets: {sorted(RECIPES)} (or a JSON file)")
