"""A small resumable training loop: warmup + cosine schedule, periodic checkpoints, a logged progress line."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .recipe import StageBudget

log = logging.getLogger(__name__)


def lr_at(step: int, budget: StageBudget) -> float:
    """Linear warmup to the peak, then cosine decay to 5% of it."""
    if step < budget.warmup:
        return budget.lr * (step + 1) / budget.warmup
    frac = (step - budget.warmup) / max(1, budget.steps - budget.warmup)
    return budget.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train_loop(
    name: str,
    run_dir: Path,
    modules: dict[str, nn.Module],
    param_groups: list[dict[str, Any]],
    budget: StageBudget,
    step_fn: Callable[[int], tuple[torch.Tensor, int]],
    *,
    resume: bool = True,
) -> dict[str, Any]:
    """Run `budget.steps` optimiser steps of `step_fn(step) -> (loss, examples)`; resumable from run_dir/name.ckpt.

    Each param group may carry `lr_scale` (its rate relative to the schedule). Returns a summary with the loss
    curve (mean per logging window), the seconds spent and the examples seen.
    """
    ckpt_path = run_dir / f"{name}.ckpt"
    opt = torch.optim.AdamW(param_groups, lr=budget.lr, weight_decay=budget.weight_decay, betas=(0.9, 0.98))
    start, curve, seconds, examples = 0, [], 0.0, 0
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=False)
        for key, module in modules.items():
            module.load_state_dict(state["modules"][key])
        opt.load_state_dict(state["optimizer"])
        start, curve, seconds, examples = state["step"], state["curve"], state["seconds"], state["examples"]
        log.info("%s: resumed at step %d/%d", name, start, budget.steps)

    def save(step: int) -> None:
        state = {
            "modules": {k: m.state_dict() for k, m in modules.items()}, "optimizer": opt.state_dict(), "step": step,
            "curve": curve, "seconds": seconds, "examples": examples,
        }
        torch.save(state, ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)

    for m in modules.values():
        m.train()
    window, window_n, t_window = 0.0, 0, time.perf_counter()
    for step in range(start, budget.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, budget)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss, n = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in param_groups for p in g["params"]], 1.0)
        opt.step()
        seconds += time.perf_counter() - t0
        examples += n
        window += float(loss.detach())
        window_n += 1
        done = step + 1
        if done % budget.log_every == 0 or done == budget.steps:
            rate = window_n * n / max(1e-9, time.perf_counter() - t_window)
            eta = (budget.steps - done) * n / max(rate, 1e-9)
            curve.append(window / window_n)
            log.info(
                "%s %5d/%d loss %.4f lr %.2e %.0f ex/s eta %dm%02ds", name, done, budget.steps, window / window_n, lr,
                rate, eta // 60, eta % 60,
            )
            window, window_n, t_window = 0.0, 0, time.perf_counter()
        if done % budget.checkpoint_every == 0 or done == budget.steps:
            save(done)
    for m in modules.values():
        m.eval()
    return {"stage": name, "steps": budget.steps, "seconds": round(seconds, 1), "examples": examples, "curve": curve}
