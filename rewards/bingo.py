"""Bingo length rewards (Liu et al., arXiv 2506.08125; code: github microsoft/Bingo, verl patches).

Formulas as in the authors' release (``verl_patches/trainer/ppo/ray_trainer.py``, ``compute_advantage``
for adv_estimator "bingo"; defaults from ``train/run_bingo_all.sh``). For response i with n_sig
significant and n_ins insignificant units, and a reference with ref_sig / ref_ins:

    low_i  = n_ins / ref_ins,   high_i = n_sig / ref_sig      (both 0 when ref_sig == 0 or ref_ins == 0)
    correct:  R_i = lambda_c * cos(clamp(low_i, 0, pi/2))                               in [0, lambda_c]
    wrong:    R_i = min(0, lambda_w_n * (cos(clamp(low_i, 0, pi/2)) - 1) + w_e * high_i - lambda_w_e)

Significance-aware length reward: only insignificant tokens (low_i) are penalised, with cosine shaping.
Dynamic length reward: for wrong answers (the hard cases) w_e > 0 first rewards *more* significant
reasoning (high_i); ``DynamicLengthSchedule`` then lowers w_e to negative values once accuracy stops
improving, turning it into a brevity pressure. Defaults: lambda_c = 5, lambda_w_n = 2, lambda_w_e = 5,
threshold 0.5, slope start 50 steps, look-back 10 steps, slope threshold 2.5, decay 0.5 per step.
R_i is *added* to the correctness reward (the release adds it to the 0/1 score), so select
``reward=[correctness,bingo]``.

Our one adaptation: the release takes the reference counts from a response to the same prompt sampled
by the reference policy (an extra generation pass). ``reference: group`` (default) uses the mean counts
over the prompt's G responses instead (no extra generation); ``reference: metadata`` reads
``metadata["ref_significant"]`` / ``metadata["ref_insignificant"]`` (e.g. from AAPO's momentum rollout
scored with the same scorer), which reproduces the release exactly.
"""

from __future__ import annotations

import math

import torch

from rewards.length import _correct

HALF_PI = math.pi / 2


def bingo_length_reward(
    correct: torch.Tensor,
    num_significant: torch.Tensor,
    num_insignificant: torch.Tensor,
    ref_significant: torch.Tensor,
    ref_insignificant: torch.Tensor,
    *,
    w_e: float,
    lambda_c: float = 5.0,
    lambda_w_n: float = 2.0,
    lambda_w_e: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R [batch], low ratio [batch], high ratio [batch]) from the formula in the module docstring."""
    counts = [t.to(torch.float64) for t in (num_significant, num_insignificant, ref_significant, ref_insignificant)]
    n_sig, n_ins, r_sig, r_ins = counts
    valid = (r_sig > 0) & (r_ins > 0)
    low = torch.where(valid, n_ins / r_ins.clamp(min=1e-12), torch.zeros_like(n_ins))
    high = torch.where(valid, n_sig / r_sig.clamp(min=1e-12), torch.zeros_like(n_sig))
    cos_low = torch.cos(low.clamp(0.0, HALF_PI))
    reward_correct = lambda_c * cos_low
    reward_wrong = (lambda_w_n * (cos_low - 1.0) + w_e * high - lambda_w_e).clamp(max=0.0)
    return torch.where(correct.bool(), reward_correct, reward_wrong), low, high


class DynamicLengthSchedule:
    """w_e, the weight of the significant-length term for wrong answers, from the accuracy trend.

    As in the release (``RayPPOTrainer.fit``): before ``start_step`` w_e = lambda_w_e / (pi/2). From then
    on, after each step the least-squares slope of accuracy over the last ``period`` steps is scaled so that
    the first measured slope maps to lambda_w_e / (pi/2); if the scaled slope <= ``threshold`` (a plateau)
    the low-slope counter k increments and w_e = max(-2 * lambda_w_e / (pi/2), -decay * k) (negative: a
    brevity reward); otherwise k = 0 and w_e = scaled slope. ``update`` is called once per training step
    with that step's per-group accuracies; the value it returns applies from the next step on.
    """

    def __init__(self, lambda_w_e: float = 5.0, start_step: int = 50, period: int = 10, threshold: float = 2.5, decay: float = 0.5):
        if period < 1:
            raise ValueError(f"reward.bingo.schedule.period must be >= 1, got {period}")
        self.lambda_w_e, self.start_step, self.period = lambda_w_e, start_step, period
        self.threshold, self.decay = threshold, decay
        self.value = lambda_w_e / HALF_PI
        self.steps: list[int] = []
        self.accuracies: list[float] = []
        self.initial_slope: float | None = None
        self.scale = 1.0
        self.low_slope_count = 0

    def update(self, step: int, group_accuracy: torch.Tensor) -> float:
        if self.steps and step <= self.steps[-1]:
            return self.value  # one update per step (e.g. momentum-model responses scored in the same step)
        self.steps.append(int(step))
        self.accuracies.append(float(torch.as_tensor(group_accuracy, dtype=torch.float64).mean()))
        if step >= self.start_step and len(self.steps) >= 2:
            look_back = min(self.period, len(self.steps) - 1)
            x = torch.tensor(self.steps[-look_back:], dtype=torch.float64)
            y = torch.tensor(self.accuracies[-look_back:], dtype=torch.float64)
            var = ((x - x.mean()) ** 2).sum()
            slope = float(((x - x.mean()) * (y - y.mean())).sum() / var) if var > 0 else 0.0
            if self.initial_slope is None:
                self.initial_slope = slope
                base = self.lambda_w_e / HALF_PI
                self.scale = base if slope == 0 else base / max(1e-6, abs(slope))
            scaled = slope * self.scale
            if scaled <= self.threshold:
                self.low_slope_count += 1
                self.value = max(-2 * self.lambda_w_e / HALF_PI, -self.decay * self.low_slope_count)
            else:
                self.low_slope_count = 0
                self.value = scaled
        return self.value

    def state_dict(self) -> dict:
        keys = ("value", "steps", "accuracies", "initial_slope", "scale", "low_slope_count")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class BingoLengthReward:
    """Reward component: significance-aware + dynamic length reward (see module docstring).

    ``scorer``: a significance scorer (rewards.significance); Hydra instantiates it from the nested node.
    Correctness comes from the ``correctness`` component of the same batch (or metadata["correct"]).
    Diagnostics: num_significant, num_insignificant, low_ratio, high_ratio, w_e.
    """

    def __init__(
        self,
        scorer,
        lambda_c: float = 5.0,
        lambda_w_n: float = 2.0,
        lambda_w_e: float = 5.0,
        reference: str = "group",
        dynamic: bool = True,
        schedule_start_step: int = 50,
        schedule_period: int = 10,
        schedule_threshold: float = 2.5,
        schedule_decay: float = 0.5,
    ):
        if reference not in ("group", "metadata"):
            raise ValueError(f"reward.bingo.reference must be 'group' or 'metadata', got {reference!r}")
        self.scorer = scorer
        self.lambda_c, self.lambda_w_n, self.lambda_w_e = lambda_c, lambda_w_n, lambda_w_e
        self.reference, self.dynamic = reference, dynamic
        self.schedule = DynamicLengthSchedule(
            lambda_w_e, schedule_start_step, schedule_period, schedule_threshold, schedule_decay
        )

    def __call__(self, prompts, responses, response_ids, metadata, *, step: int = 0, group_size: int = 1, components=None, **context):
        batch = len(responses)
        if batch % group_size:
            raise ValueError(f"reward.bingo: batch {batch} is not a whole number of groups of {group_size}")
        correct = _correct(components, metadata, batch)  # [batch] bool
        flags = self.scorer(responses, response_ids, metadata)
        n_sig = torch.tensor([int(f.sum()) for f in flags], dtype=torch.float64)  # [batch]
        n_ins = torch.tensor([int((~f).sum()) for f in flags], dtype=torch.float64)
        if self.reference == "group":
            ref_sig = n_sig.view(-1, group_size).mean(dim=1).repeat_interleave(group_size)
            ref_ins = n_ins.view(-1, group_size).mean(dim=1).repeat_interleave(group_size)
        else:
            try:
                ref_sig = torch.tensor([float(m["ref_significant"]) for m in metadata], dtype=torch.float64)
                ref_ins = torch.tensor([float(m["ref_insignificant"]) for m in metadata], dtype=torch.float64)
            except KeyError as err:
                raise KeyError(f"reward.bingo.reference=metadata needs metadata[{err}] for every sample") from err
        w_e = self.schedule.value if self.dynamic else self.lambda_w_e / HALF_PI
        reward, low, high = bingo_length_reward(
            correct, n_sig, n_ins, ref_sig, ref_ins,
            w_e=w_e, lambda_c=self.lambda_c, lambda_w_n=self.lambda_w_n, lambda_w_e=self.lambda_w_e,
        )
        if self.dynamic:  # the release updates after the step, for the next one
            self.schedule.update(step, correct.to(torch.float64).view(-1, group_size).mean(dim=1))
        diagnostics = {
            "num_significant": n_sig, "num_insignificant": n_ins, "low_ratio": low, "high_ratio": high,
            "w_e": torch.full((batch,), w_e, dtype=torch.float64),
        }
        return reward.to(torch.float32), diagnostics

    def state_dict(self) -> dict:
        return self.schedule.state_dict() if self.dynamic else {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.schedule.load_state_dict(state)
