"""Several questions about one image in one training sequence, computed as if each were alone.

A row is `<s>USER: ` + visual slots (the shared prefix), then one segment per question (`\\n{question} ASSISTANT:
{answer}</s>`). Each segment attends to the prefix and to itself (causally) only, and its positions restart right
after the prefix, exactly where a lone prompt's question sits: the logits of a segment equal those of the separate
sequence `prefix + segment`, while the prefix (most of the tokens) goes through the LM once instead of once per
question.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vlmserve.model.vlm import VisionLanguageModel

# What pack_rows returns: ids (B, T), positions (B, T), mask (B, 1, T, T) and targets (B, T - 1)
PackedRows = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def pack_rows(
    prefix: Sequence[int] | Sequence[Sequence[int]], segments: Sequence[Sequence[tuple[list[int], list[int]]]],
    pad_id: int,
) -> PackedRows:
    """Rows of a prefix + (prompt part, answer) segments -> ids (B, T), positions (B, T), mask (B, 1, T, T) and
    targets (B, T - 1) (-100 except where the next token belongs to an answer). `prefix`: one shared by every row,
    or one per row (a clip's audio slots differ in number with its length)."""
    prefixes: list[list[int]]
    if not prefix or isinstance(prefix[0], int):
        prefixes = [[int(t) for t in prefix]] * len(segments)  # type: ignore[arg-type]
    else:
        prefixes = [[int(t) for t in row] for row in prefix]  # type: ignore[union-attr]
    if len(prefixes) != len(segments):
        raise ValueError(f"{len(prefixes)} prefixes for {len(segments)} rows")
    rows, pos_rows, seg_rows, tgt_rows = [], [], [], []
    for row_prefix, segs in zip(prefixes, segments, strict=True):
        p = len(row_prefix)
        ids, pos, seg, lab = list(row_prefix), list(range(p)), [-1] * p, [-100] * p
        for j, (prompt, answer) in enumerate(segs):
            ids += prompt + answer
            pos += list(range(p, p + len(prompt) + len(answer)))
            seg += [j] * (len(prompt) + len(answer))
            lab += [-100] * len(prompt) + answer  # the answer tokens are the labels
        rows.append(ids)
        pos_rows.append(pos)
        seg_rows.append(seg)
        tgt_rows.append(lab[1:])  # the prediction at t is of the token at t + 1
    width = max(len(r) for r in rows)
    ids_t = torch.full((len(rows), width), pad_id)  # (B, T)
    pos_t = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
    seg_t = torch.full((len(rows), width), -2)  # (B, T) -1 prefix, -2 padding
    tgt_t = torch.full((len(rows), width - 1), -100)  # (B, T - 1)
    for b, (r, ps, sg, tg) in enumerate(zip(rows, pos_rows, seg_rows, tgt_rows, strict=True)):
        ids_t[b, : len(r)] = torch.tensor(r)
        pos_t[b, : len(r)] = torch.tensor(ps)
        pos_t[b, len(r) :] = torch.arange(len(prefixes[b]), len(prefixes[b]) + width - len(r))
        seg_t[b, : len(r)] = torch.tensor(sg)
        tgt_t[b, : len(tg)] = torch.tensor(tg)
    idx = torch.arange(width)
    causal = idx[None, :] <= idx[:, None]  # (T, T): key s at or before query t
    same = seg_t[:, :, None] == seg_t[:, None, :]  # (B, T, T)
    to_prefix = (seg_t == -1)[:, None, :]  # (B, 1, T)
    mask = causal[None] & (same | to_prefix)  # (B, T, T)
    return ids_t, pos_t, mask[:, None], tgt_t


def packed_logits(
    model: VisionLanguageModel,
    ids: torch.Tensor,  # (B, T)
    positions: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, 1, T, T) bool
    vision_features: torch.Tensor,  # (B, P, Dv)
) -> torch.Tensor:
    """Logits (B, T, V) of packed rows: visual tokens merged at the slots, the LM run under the segment mask."""
    embeds = model.embed_tokens(ids)  # (B, T, D)
    embeds = model.merge_at_placeholders(ids, embeds, model.project(vision_features))  # (B, T, D)
    return model.language_model(inputs_embeds=embeds, positions=positions, mask=mask)  # (B, T, V)


def packed_loss(model: VisionLanguageModel, batch: tuple[torch.Tensor, ...], features: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every answer token of the packed batch."""
    ids, positions, mask, target = batch
    logits = packed_logits(model, ids, positions, mask, features)  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100)
