"""What an RL step reports: seconds per phase, the step's metrics (W&B / metrics.jsonl keys) and the sample table."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Seconds per phase of the current step (``perf/time_<phase>``); a phase may be timed several times."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def reset(self) -> None:
        self.seconds = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


# the loss's metrics (algorithms/) reported as train/<key>, means over micro-batches: PPO / GSPO clipping, CISPO's
# clipped weights, Clip-Cov / KL-Cov's share of tokens, KL to the reference, rollout/trainer mismatch correction
MEAN_STATS = ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "clip_frac", "ratio_mean", "kl", "cov_clip_frac",
              "cov_kl_frac", "mismatch_kl", "mismatch_weight_clip_frac")


def step_metrics(step: int, batch, rewards: torch.Tensor, advantages: torch.Tensor, stats: dict, *,
                 optimizer_steps: int, world_size: int, micro_batches: int, lr: float, tokens: int,
                 seconds: dict, worker_restarts: int, kl_in_reward: bool) -> dict:
    """The metrics of step ``step`` (1-based, after its update). ``batch``: the step's rollouts (train/rl/rounds.py
    StepBatch); ``rewards``: after any KL folding (``batch.rewards`` is the task reward); ``stats``: the trainer
    ranks' sums over micro-batches and optimizer steps; ``micro_batches``: the micro-batches the update ran, over all
    ranks, PPO mini-batches and epochs (a fixed count, or what trainer.max_tokens_per_micro_batch needed)."""
    rollouts = batch.rollouts
    lengths = torch.tensor([len(r.response_ids) for r in rollouts], dtype=torch.float)
    oldest = min(r.policy_version for r in rollouts)
    per_rank_step = world_size * optimizer_steps
    metrics = {
        "reward/total": rewards.mean().item(),
        **({"reward/task": batch.rewards.mean().item()} if kl_in_reward else {}),
        **({"reward/momentum_total": batch.momentum_rewards.mean().item()} if batch.momentum_rewards is not None else {}),
        **({"reward/greedy_baseline": batch.greedy_rewards.mean().item()} if getattr(batch, "greedy_rewards", None) is not None else {}),
        **{f"reward/{k}": v.float().mean().item() for k, v in batch.components.items()},
        "rollout/response_length_mean": lengths.mean().item(),
        "rollout/response_length_p90": lengths.quantile(0.9).item(),
        "rollout/clipped_fraction": sum(r.truncated for r in rollouts) / len(rollouts),
        "rollout/policy_version": oldest,
        "rollout/staleness": step - 1 - oldest,  # updates since sampling
        "rollout/worker_restarts": worker_restarts,
        "rollout/dropped_groups": batch.dropped_groups,
        "rollout/kept_groups": batch.kept_groups,
        "rollout/sampling_rounds": batch.rounds,
        "train/advantage_mean": advantages.mean().item(),
        "train/advantage_std": advantages.std().item() if len(advantages) > 1 else 0.0,
        "train/advantage_abs_mean": advantages.abs().mean().item(),
        "train/loss": stats.get("loss_sum", 0.0) / optimizer_steps,
        "train/optimizer_steps": optimizer_steps,
        "train/micro_batches": micro_batches,
        "train/entropy": stats.get("entropy_sum", 0.0) / max(stats.get("tokens", 1.0), 1.0),
        "train/grad_norm": stats.get("grad_norm", float("nan")) / per_rank_step,
        "train/lr": lr,
        **{f"perf/time_{k}": v for k, v in seconds.items()},
        "perf/tokens_per_s": float(tokens) / sum(seconds.values()),
    }
    for key in MEAN_STATS:  # means over micro-batches
        if key in stats:
            metrics[f"train/{key}"] = stats[key] / micro_batches
    return metrics


def skipped_step_metrics(batch) -> dict:
    """A step whose every group was dropped (DAPO): nothing to learn from, no update."""
    return {"rollout/dropped_groups": batch.dropped_groups, "rollout/kept_groups": batch.kept_groups,
            "rollout/sampling_rounds": batch.rounds, "train/skipped_update": 1.0}


def sample_table(owners, rollouts, rewards, components, per_group: int = 2, max_rows: int = 16) -> list[dict]:
    """Rows of the W&B sample table: the first ``per_group`` responses of each prompt, up to ``max_rows``."""
    rows, seen = [], {}
    for i, (prompt, rollout) in enumerate(zip(owners, rollouts)):
        seen[prompt.prompt_id] = seen.get(prompt.prompt_id, 0) + 1
        if seen[prompt.prompt_id] > per_group or len(rows) >= max_rows:
            continue
        rows.append({"prompt_id": prompt.prompt_id, "prompt": prompt.text, "response": rollout.response_text,
                     "answer": str(prompt.answer), "reward": float(rewards[i]),
                     **{f"reward_{k}": float(v[i]) for k, v in components.items()},
                     "length": len(rollout.response_ids), "truncated": bool(rollout.truncated),
                     "policy_version": rollout.policy_version})
    return rows
