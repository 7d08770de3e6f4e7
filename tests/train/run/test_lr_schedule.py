"""The one lr schedule (train/run/lr_schedule.py) against the formula computed by hand in float64."""

import math

import pytest
import torch

from train.run.lr_schedule import restore, warmup_then_decay


def _by_hand(step: int, peak: float, warmup: int, total: int, floor: float, decay: str) -> float:
    if step < warmup:
        return peak * step / warmup
    progress = min((step - warmup) / (total - warmup), 1.0)
    shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[decay]
    return peak * (floor + (1 - floor) * shape) if decay != "constant" else peak


def _used_lrs(scheduler, steps: int) -> list[float]:
    used = []
    for _ in range(steps):
        used.append(scheduler.optimizer.param_groups[0]["lr"])  # the lr the optimizer step would use
        scheduler.optimizer.step()
        scheduler.step()
    return used


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup,floor", [(0, 0.1), (3, 0.1), (3, 0.0), (2, 1.0)])
def test_schedule_follows_the_formula(decay, warmup, floor):
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=1.0)
    used = _used_lrs(warmup_then_decay(optimizer, 3e-3, warmup, 12, floor, decay), 12)  # the steps it spans
    assert used == pytest.approx([_by_hand(s, 3e-3, warmup, 12, floor, decay) for s in range(12)], rel=1e-12, abs=1e-18)


def test_a_second_phase_starts_from_its_own_peak_and_restore_resumes_mid_schedule():
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=1e-2)
    _used_lrs(warmup_then_decay(optimizer, 1e-2, 2, 4, 0.1, "cosine"), 4)
    second = warmup_then_decay(optimizer, 5e-3, 0, 6, 0.0, "linear")
    first_three = _used_lrs(second, 3)
    assert first_three == pytest.approx([5e-3 * (1 - s / 6) for s in range(3)], rel=1e-12)
    saved = second.state_dict()
    # a resumed run builds the phase's schedule again (lr(0)) and restores the saved position
    fresh = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=1e-2)
    resumed = warmup_then_decay(fresh, 5e-3, 0, 6, 0.0, "linear")
    restore(resumed, saved)
    assert _used_lrs(resumed, 3) == pytest.approx([5e-3 * (1 - s / 6) for s in range(3, 6)], rel=1e-12)


def test_unknown_decay_is_refused():
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=1.0)
    with pytest.raises(ValueError, match="decay 'step' must be one of cosine, linear, constant"):
        warmup_then_decay(optimizer, 1e-3, 0, 10, 0.0, "step")


def test_a_linear_phase_that_is_all_warmup_steps_past_its_end():
    """transformers' polynomial schedule divides by total - warmup; a phase of only warmup must still step."""
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=1.0)
    used = _used_lrs(warmup_then_decay(optimizer, 2e-3, 4, 4, 0.1, "linear"), 5)  # the 5th: the step after the phase
    assert used[:4] == pytest.approx([0.0, 5e-4, 1e-3, 1.5e-3], rel=1e-12, abs=1e-18)
