"""The policy update of one RL step: ``trainer.ppo_epochs`` passes over the step's optimizer steps (PPO
mini-batches), each on the trainer group's ranks; returns the ranks' stats summed over micro-batches and steps."""

from __future__ import annotations

import torch


def update_policy(trainer, algorithm, updates, advantages: torch.Tensor, logprobs, epochs: int) -> dict:
    extras = [[{"advantages": advantages[torch.tensor(members)], "old_logprobs": old, "ref_logprobs": ref}
               for members, old, ref in zip(u.members, logprobs.old[k], logprobs.ref[k])]
              for k, u in enumerate(updates)]
    stats: dict[str, float] = {}
    for _ in range(epochs):
        for update, update_extras in zip(updates, extras):
            for rank_stats in trainer.train_step(update.micro, algorithm.loss(update), update_extras):
                for key, value in rank_stats.items():
                    stats[key] = stats.get(key, 0.0) + value
    return stats
