"""The hearing recipe: the audio tower's sizes, the pools and each hearing stage's budget (training/hearing.py)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .recipe import StageBudget


@dataclass(frozen=True)
class HearingRecipe:
    """Everything a hearing run needs on top of its base model; `HEARING_RECIPES` below."""

    name: str
    # the finished SHAPES model that learns to hear: the export of `train --config shapes-finetune --out runs/shapes`
    # (the shipped run started from weights/shapes-llava as it was before it heard, the same model)
    base: str = "runs/shapes/model"
    seed: int = 0
    mel_bins: int = 80
    window_seconds: int = 3  # the feature window: SOUNDS clips are 1-3 s; 150 encoder positions, 75 audio tokens
    audio_hidden: int = 128
    audio_layers: int = 4
    audio_heads: int = 4
    audio_intermediate: int = 512
    projector: str = "mlp"
    hear_pool: int = 8000  # clips for stage 0
    lm_pool: int = 8000  # clips for stages 1-2 (a separate draw)
    image_pool: int = 8000  # SHAPES images for stage 2 (the base's frozen encoder features, cached)
    heldout: int = 512  # clips (and half as many SHAPES images) measured after stages 0 and 2
    hear: StageBudget = field(default_factory=lambda: StageBudget(steps=700, batch=64, lr=2e-3, warmup=50,
                                                                  checkpoint_every=100))
    align: StageBudget = field(default_factory=lambda: StageBudget(steps=150, batch=64, lr=2e-3, warmup=20,
                                                                   checkpoint_every=50))
    instruct: StageBudget = field(default_factory=lambda: StageBudget(steps=1200, batch=32, lr=1e-3, warmup=60,
                                                                      checkpoint_every=100))
    questions_per_item: int = 4
    audio_share: float = 0.5  # of the rows of a stage-2 batch (the rest: SHAPES images)
    sound_weights: dict[str, float] = field(
        default_factory=lambda: {"count": 0.15, "pitch": 0.2, "kind": 0.2, "exists": 0.15, "caption": 0.3})
    shape_weights: dict[str, float] = field(
        default_factory=lambda: {"color": 0.12, "shape": 0.1, "count": 0.08, "exists": 0.15, "caption": 0.55})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> HearingRecipe:
        d: dict[str, Any] = json.loads(text)
        for stage in ("hear", "align", "instruct"):
            d[stage] = StageBudget(**d[stage])
        return cls(**d)


HEARING = HearingRecipe(name="hearing")
HEARING_SMOKE = replace(
    HEARING, name="hearing-smoke", audio_hidden=32, audio_layers=2, audio_heads=2, audio_intermediate=64,
    hear_pool=32, lm_pool=32, image_pool=32, heldout=16,
    hear=StageBudget(steps=6, batch=8, lr=3e-3, warmup=2, checkpoint_every=3, log_every=3),
    align=StageBudget(steps=4, batch=8, lr=3e-3, warmup=2, checkpoint_every=2, log_every=2),
    instruct=StageBudget(steps=6, batch=8, lr=3e-3, warmup=2, checkpoint_every=3, log_every=3),
)
HEARING_RECIPES: dict[str, HearingRecipe] = {r.name: r for r in (HEARING, HEARING_SMOKE)}
