"""Dense per-patch heads for the vision encoder's pretraining (stage 0); discarded afterwards."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .world import COLORS, PAIRS, SHAPES

# (name, classes) of each per-patch target, in the order of world.Pool.labels' channels.
TARGETS: tuple[tuple[str, int], ...] = (
    ("pair", len(PAIRS) + 1),
    ("color", len(COLORS) + 1),
    ("shape", len(SHAPES) + 1),
    ("rank", 4),
    ("count", 3),
)


class PatchHeads(nn.Module):
    """LayerNorm then one Linear per target on every patch feature; `count` also read from the class token."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict({name: nn.Linear(dim, n) for name, n in TARGETS})

    def forward(self, states: torch.Tensor) -> dict[str, torch.Tensor]:  # (N, 1 + P, D)
        x = self.norm(states)  # (N, 1 + P, D)
        return {name: head(x) for name, head in self.heads.items()}  # each (N, 1 + P, C)

    def loss(self, states: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed cross-entropy over targets; labels (N, 5, G, G). Returns the loss and per-target patch accuracy."""
        out = self(states)
        total = states.new_zeros(())
        acc: dict[str, float] = {}
        for i, (name, _) in enumerate(TARGETS):
            target = labels[:, i].flatten(1)  # (N, P)
            logits = out[name][:, 1:]  # (N, P, C)
            total = total + F.cross_entropy(logits.flatten(0, 1), target.flatten())
            acc[name] = float((logits.argmax(-1) == target).float().mean())
        count_cls = out["count"][:, 0]  # (N, 3)
        total = total + F.cross_entropy(count_cls, labels[:, 4, 0, 0])
        return total, acc
