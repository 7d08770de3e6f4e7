"""The learning-rate schedule of every recipe, as transformers computes it.

    lr(s) = peak * s / W                                   for s < W (linear warmup from 0)
    lr(s) = peak * (m + (1 - m) * d((s - W) / (T - W)))    after, with d(p) = (1 + cos(pi p)) / 2 (cosine),
                                                            1 - p (linear) or 1 (constant)

for step s (0-based: the optimizer step about to run), W warmup steps, T steps the schedule spans and floor
m = min_lr_ratio. One ``LambdaLR`` from transformers' schedule functions
(``get_cosine_with_min_lr_schedule_with_warmup``, ``get_polynomial_decay_schedule_with_warmup`` with power 1,
``get_constant_schedule_with_warmup``); its ``state_dict()`` goes into the checkpoint with the optimizer's.
SFT steps it once per optimizer step (a curriculum builds one per phase); RL once per RL step (as verl), however
many optimizer steps that step takes.
"""

from __future__ import annotations

from torch.optim.lr_scheduler import LambdaLR
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
)

DECAYS = ("cosine", "linear", "constant")


def warmup_then_decay(optimizer, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float,
                      decay: str = "cosine") -> LambdaLR:
    """The schedule above on ``optimizer`` (its lr is set to lr(0) at once); ``scheduler.step()`` after each step."""
    if decay not in DECAYS:
        raise ValueError(f"lr decay {decay!r} must be one of {', '.join(DECAYS)}")
    for group in optimizer.param_groups:  # a later phase's schedule starts from its own peak, not the first's
        group["lr"] = group["initial_lr"] = peak_lr
    if decay == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, total_steps, min_lr_rate=min_lr_ratio)
    if decay == "linear" and min_lr_ratio < 1.0:
        optimizer.defaults["lr"] = peak_lr  # the polynomial schedule reads its peak from the optimizer's defaults
        # it divides by total - warmup unguarded (a phase that is all warmup): one decay step at least
        return get_polynomial_decay_schedule_with_warmup(optimizer, warmup_steps, max(total_steps, warmup_steps + 1),
                                                         lr_end=peak_lr * min_lr_ratio, power=1.0)
    return get_constant_schedule_with_warmup(optimizer, warmup_steps)


def restore(scheduler: LambdaLR, state: dict) -> None:
    """Load a saved ``scheduler.state_dict()`` and give the optimizer the lr of the step it resumes at (building
    the schedule set lr(0); loading the state alone would not touch the optimizer)."""
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
