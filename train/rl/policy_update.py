"""The policy update of one RL step: ``trainer.ppo_epochs`` passes over the step's optimizer steps (PPO
mini-batches), each on the trainer group's ranks; returns the ranks' stats summed over micro-batches and steps."""

from __future__ import annotations

import torch


def rollout_logprobs(rollouts, members: list[int]) -> torch.Tensor:
    """The sampler's log-probs of micro-batch ``members``' response tokens, [docs, longest response], zero-padded
    (the loss mask covers a response's tokens in order, as ``per_document`` lays them out)."""
    missing = [i for i in members if rollouts[i].logprobs is None]
    if missing:
        raise ValueError("algorithm.loss.mismatch needs the sampler's log-probs, but this rollout backend recorded none "
                         "(Rollout.logprobs is None: multi-turn chats); set algorithm.loss.mismatch=null")
    width = max((len(rollouts[i].response_ids) for i in members), default=0)
    out = torch.zeros(len(members), width)  # [docs, resp_len]
    for row, i in enumerate(members):
        out[row, : len(rollouts[i].logprobs)] = torch.tensor(rollouts[i].logprobs)
    return out


def update_policy(trainer, algorithm, updates, advantages: torch.Tensor, logprobs, epochs: int, rollouts=None) -> dict:
    """``rollouts``: the step's rollouts, read for their sampling log-probs when the loss corrects the mismatch."""
    correct = getattr(algorithm, "mismatch_correction", False)
    extras = [[{"advantages": advantages[torch.tensor(members)], "old_logprobs": old, "ref_logprobs": ref,
                **({"rollout_logprobs": rollout_logprobs(rollouts, members)} if correct else {})}
               for members, old, ref in zip(u.members, logprobs.old[k], logprobs.ref[k])]
              for k, u in enumerate(updates)]
    stats: dict[str, float] = {}
    for _ in range(epochs):
        for update, update_extras in zip(updates, extras):
            for rank_stats in trainer.train_step(update.micro, algorithm.loss(update), update_extras):
                for key, value in rank_stats.items():
                    stats[key] = stats.get(key, 0.0) + value
    return stats
