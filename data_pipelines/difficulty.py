"""Difficulty-aware prompt sampling for RL: a per-prompt pass-rate tracker and two samplers that read it.

The samplers have data_pipelines.prompts.PromptSampler's interface (``next()`` -> list of Prompt,
``state_dict()`` / ``load_state_dict()``, deterministic given ``seed``) plus ``update(prompt_ids, correct)``,
which the RL driver calls with every rollout's correctness after scoring a batch:

    batch = sampler.next()
    ... rollouts, rewards ...
    sampler.update([batch[r.prompt_index].prompt_id for r in rollouts], correctness_per_rollout)

- ``BandSampler``: prompts whose estimated pass rate lies in [low, high] (neither solved nor hopeless, so
  group-relative advantages are non-zero), with a share of each batch for unseen prompts (``explore``) and a
  share drawn uniformly (``refresh``: out-of-band estimates go stale as the policy changes).
- ``ScheduleSampler``: easy to hard over ``total_steps``, either by a difficulty value in the prompt meta
  (``key``, e.g. ``difficulty.num_ops`` or the synthesis pipeline's ``difficulty.pass_rate``) or, without a key,
  by the tracked pass rate (a target band that slides from ``start_pass_rate`` to ``end_pass_rate``).
"""

from __future__ import annotations

import random

from data_pipelines.prompts import Prompt


class PassRateTracker:
    """Per-prompt pass rate from rollout correctness, a Beta-prior posterior mean with optional forgetting.

        estimate(p) = (s_p + prior * prior_strength) / (n_p + prior_strength)
        update:  s_p <- decay * s_p + (correct rollouts of p),  n_p <- decay * n_p + (rollouts of p)

    ``decay = 1`` keeps plain counts; ``decay < 1`` discounts a prompt's older batches (an EMA over its updates),
    so estimates follow a policy that improves. Unseen prompts get ``prior``.
    """

    def __init__(self, prior: float = 0.5, prior_strength: float = 2.0, decay: float = 1.0):
        if not 0.0 <= prior <= 1.0:
            raise ValueError(f"sampler.tracker.prior={prior} must be a pass rate in [0, 1]")
        if prior_strength <= 0:
            raise ValueError(f"sampler.tracker.prior_strength={prior_strength} must be > 0 (pseudo-rollouts of the prior)")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"sampler.tracker.decay={decay} must be in (0, 1] (1 = plain counts)")
        self.prior, self.prior_strength, self.decay = prior, prior_strength, decay
        self.stats: dict[str, list[float]] = {}  # prompt id -> [correct, rollouts] (discounted)

    def update(self, prompt_ids: list[str], correct) -> None:
        """``prompt_ids[i]`` and ``correct[i]`` (bool or a score in [0, 1]) for every rollout i of a batch."""
        correct = [float(c) for c in correct]
        if len(correct) != len(prompt_ids):
            raise ValueError(f"tracker update: {len(prompt_ids)} prompt ids but {len(correct)} correctness values")
        bad = [c for c in correct if not 0.0 <= c <= 1.0]
        if bad:
            raise ValueError(f"tracker update: correctness must lie in [0, 1] (1 = solved), got {bad[:3]}")
        batch: dict[str, list[float]] = {}
        for prompt_id, c in zip(prompt_ids, correct):
            entry = batch.setdefault(prompt_id, [0.0, 0.0])
            entry[0] += c
            entry[1] += 1.0
        for prompt_id, (s, n) in batch.items():
            old = self.stats.get(prompt_id, [0.0, 0.0])
            self.stats[prompt_id] = [self.decay * old[0] + s, self.decay * old[1] + n]

    def estimate(self, prompt_id: str) -> float:
        s, n = self.stats.get(prompt_id, (0.0, 0.0))
        return (s + self.prior * self.prior_strength) / (n + self.prior_strength)

    def seen(self, prompt_id: str) -> bool:
        return prompt_id in self.stats

    def state_dict(self) -> dict:
        return {"stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {k: list(v) for k, v in state["stats"].items()}


def _tracker(tracker) -> PassRateTracker:
    if tracker is None:
        return PassRateTracker()
    if isinstance(tracker, PassRateTracker):
        return tracker
    return PassRateTracker(**dict(tracker))


def _check_prompts(prompts: list[Prompt], batch_size: int) -> None:
    if batch_size < 1 or batch_size > len(prompts):
        raise ValueError(f"rollout.prompts_per_step={batch_size} must be between 1 and the {len(prompts)} training prompts")
    ids = [p.prompt_id for p in prompts]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"prompt id {dup!r} appears more than once; a difficulty sampler tracks prompts by id, so ids must be unique")


def _check_fraction(value: float, key: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{key}={value} must be a fraction in [0, 1]")
    return float(value)


class BandSampler:
    """Batches of prompts whose estimated pass rate lies in [low, high].

    Per batch: ``round(explore * B)`` slots for unseen prompts (while there are any), ``round(refresh * B)``
    uniform slots, the rest from seen prompts in the band; if the band runs short, unseen prompts and then the
    seen prompts nearest the band fill the gap. Random choices come from (seed, step), so the state is the step
    and the tracker.
    """

    def __init__(self, prompts: list[Prompt], batch_size: int, seed: int, low: float = 0.2, high: float = 0.8,
                 explore: float = 0.25, refresh: float = 0.05, tracker=None):
        _check_prompts(prompts, batch_size)
        low, high = _check_fraction(low, "sampler.low"), _check_fraction(high, "sampler.high")
        if low > high:
            raise ValueError(f"sampler.low={low} > sampler.high={high}: the band is [low, high] with low <= high; swap them")
        self.explore = _check_fraction(explore, "sampler.explore")
        self.refresh = _check_fraction(refresh, "sampler.refresh")
        if self.explore + self.refresh > 1.0:
            raise ValueError(f"sampler.explore + sampler.refresh = {self.explore + self.refresh} must be <= 1")
        self.prompts, self.batch_size, self.seed = prompts, batch_size, seed
        self.low, self.high = low, high
        self.tracker = _tracker(tracker)
        self.step = 0

    def band(self) -> tuple[float, float]:
        return self.low, self.high

    def _rng(self) -> random.Random:
        return random.Random(f"{self.seed}:{type(self).__name__}:{self.step}")

    def _draw(self, rng: random.Random, low: float, high: float) -> list[int]:
        B, tracker = self.batch_size, self.tracker
        unseen = [i for i, p in enumerate(self.prompts) if not tracker.seen(p.prompt_id)]
        seen = [i for i, p in enumerate(self.prompts) if tracker.seen(p.prompt_id)]
        estimate = {i: tracker.estimate(self.prompts[i].prompt_id) for i in seen}
        in_band = [i for i in seen if low <= estimate[i] <= high]
        n_explore = min(round(self.explore * B), len(unseen))
        n_refresh = round(self.refresh * B)
        chosen = rng.sample(unseen, n_explore)
        taken = set(chosen)
        band_pool = [i for i in in_band if i not in taken]
        n_band = min(B - n_explore - n_refresh, len(band_pool))
        chosen += rng.sample(band_pool, n_band)
        taken.update(chosen)
        fill = B - n_refresh - len(chosen)
        if fill > 0:  # the band runs short: unseen prompts first, then the seen ones nearest the band
            spare = [i for i in unseen if i not in taken]
            rng.shuffle(spare)
            near = sorted((i for i in seen if i not in taken),
                          key=lambda i: (max(low - estimate[i], estimate[i] - high, 0.0), rng.random()))
            chosen += (spare + near)[:fill]
            taken.update(chosen)
        rest = [i for i in range(len(self.prompts)) if i not in taken]
        chosen += rng.sample(rest, B - len(chosen))
        rng.shuffle(chosen)
        return chosen

    def next(self) -> list[Prompt]:
        low, high = self.band()
        batch = [self.prompts[i] for i in self._draw(self._rng(), low, high)]
        self.step += 1
        return batch

    def update(self, prompt_ids: list[str], correct) -> None:
        self.tracker.update(prompt_ids, correct)

    def metrics(self) -> dict:
        """For logging: the band, the share of prompts seen, and the share whose estimate is in the band."""
        low, high = self.band()
        seen = [p for p in self.prompts if self.tracker.seen(p.prompt_id)]
        in_band = sum(low <= self.tracker.estimate(p.prompt_id) <= high for p in seen)
        return {"sampler/band_low": low, "sampler/band_high": high, "sampler/seen_fraction": len(seen) / len(self.prompts),
                "sampler/in_band_fraction": in_band / max(len(seen), 1)}

    def state_dict(self) -> dict:
        return {"step": self.step, "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.tracker.load_state_dict(state["tracker"])


def _meta_value(prompt: Prompt, key: str) -> float:
    value = prompt.meta
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            keys = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise KeyError(f"sampler.key={key!r}: prompt {prompt.prompt_id!r} has no {part!r} in its meta (found {keys}); "
                           "set sampler.key to a numeric difficulty field, or null to schedule by tracked pass rate")
        value = value[part]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"sampler.key={key!r}: prompt {prompt.prompt_id!r} has non-numeric value {value!r}") from None


class ScheduleSampler(BandSampler):
    """Easy to hard over ``total_steps`` (progress ``f = min(step / total_steps, 1)``).

    With ``key`` (a dotted path into ``Prompt.meta``; ``easier: lower`` or ``higher`` values are easier): prompts
    are ranked easiest first and each batch is drawn uniformly from the rank window
    ``[f * (1 - window), f * (1 - window) + window]`` (fractions of the ranking).
    Without ``key``: a band sampler whose band of width ``width`` is centred on a target pass rate that moves
    linearly from ``start_pass_rate`` (easy) to ``end_pass_rate`` (hard), with the same explore/refresh shares.
    """

    def __init__(self, prompts: list[Prompt], batch_size: int, seed: int, total_steps: int, key: str | None = None,
                 easier: str = "lower", window: float = 0.3, start_pass_rate: float = 0.8, end_pass_rate: float = 0.2,
                 width: float = 0.3, explore: float = 0.25, refresh: float = 0.05, tracker=None):
        super().__init__(prompts, batch_size, seed, 0.0, 1.0, explore, refresh, tracker)
        if int(total_steps) < 1:
            raise ValueError(f"sampler.total_steps={total_steps} must be >= 1 (usually trainer.max_steps)")
        if easier not in ("lower", "higher"):
            raise ValueError(f"sampler.easier={easier!r} must be 'lower' (lower values are easier) or 'higher'")
        self.total_steps, self.key = int(total_steps), key
        self.window = _check_fraction(window, "sampler.window")
        if key is not None and self.window * len(prompts) < batch_size:
            raise ValueError(f"sampler.window={window} covers {self.window * len(prompts):.0f} of {len(prompts)} prompts, "
                             f"fewer than rollout.prompts_per_step={batch_size}; raise sampler.window")
        self.start_pass_rate = _check_fraction(start_pass_rate, "sampler.start_pass_rate")
        self.end_pass_rate = _check_fraction(end_pass_rate, "sampler.end_pass_rate")
        self.width = _check_fraction(width, "sampler.width")
        self.ranked: list[int] = []
        if key is not None:
            sign = 1.0 if easier == "lower" else -1.0
            tie = random.Random(f"{seed}:ties")
            keyed = [(sign * _meta_value(p, key), tie.random(), i) for i, p in enumerate(prompts)]
            self.ranked = [i for _, _, i in sorted(keyed)]  # easiest first; ties in a seeded random order

    def progress(self) -> float:
        return min(self.step / self.total_steps, 1.0)

    def band(self) -> tuple[float, float]:
        target = self.start_pass_rate + (self.end_pass_rate - self.start_pass_rate) * self.progress()
        return max(0.0, target - self.width / 2), min(1.0, target + self.width / 2)

    def next(self) -> list[Prompt]:
        if self.key is None:
            return super().next()
        n = len(self.ranked)
        lo = int(self.progress() * (1.0 - self.window) * n)
        pool = self.ranked[lo : max(lo + int(round(self.window * n)), lo + self.batch_size)]
        batch = [self.prompts[i] for i in self._rng().sample(pool, self.batch_size)]
        self.step += 1
        return batch

    def metrics(self) -> dict:
        return {**super().metrics(), "sampler/progress": self.progress()}
