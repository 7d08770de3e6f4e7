"""The RL algorithm's parts as the step uses them, instantiated from ``cfg.algorithm`` (the math is in algorithms/):
advantages, the loss run on each trainer rank, DAPO's group filter and overlong shaping, KL folded into the reward,
AAPO's momentum update, ReMax's greedy baseline round and the rollout/trainer mismatch correction's inputs."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from hydra.utils import instantiate

from train.models.forward import per_document


class PackedLoss:
    """The objective on packed rows, run on each trainer rank: per-document tensors, then ``objective``.
    ``normalizer`` is the global count the aggregation divides by, so micro-batch losses add up exactly."""

    def __init__(self, objective, normalizer: float, entropy_bonus: bool = False):
        self.objective, self.normalizer, self.entropy_bonus = objective, normalizer, entropy_bonus

    def __call__(self, logprobs, entropy, batch, extra):
        if not self.entropy_bonus and entropy.grad_fn is not None:
            # the trainer holds this micro-batch's tensors until the next forward: without a bonus to train, drop the
            # entropy's graph now (it keeps the vocab-sized log-probs alive for a backward that never comes)
            entropy.detach_()
        lp, mask = per_document(logprobs, batch)  # [docs, resp_len]
        ent, _ = per_document(entropy, batch)
        width = lp.shape[1]
        # no recorded pi_old: one update from the weights that sampled, so pi_old is pi itself (ratio exactly 1)
        old = extra["old_logprobs"][:, :width] if extra["old_logprobs"] is not None else lp.detach()
        ref = extra["ref_logprobs"][:, :width] if extra.get("ref_logprobs") is not None else None
        rollout = extra["rollout_logprobs"][:, :width] if extra.get("rollout_logprobs") is not None else None
        loss, metrics = self.objective(lp, old, extra["advantages"], mask, ref_logprobs=ref, normalizer=self.normalizer,
                                       entropy=ent, rollout_logprobs=rollout)
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["entropy_sum"] = float((ent * mask).sum())
        metrics["tokens"] = float(mask.sum())
        return loss, metrics


@dataclass
class Algorithm:
    group_size: int
    advantage_fn: object
    objective: object
    token_mean: bool  # the aggregation divides by response tokens (else by samples)
    mask_truncated: bool  # DAPO: truncated responses carry no loss
    dynamic_sampling: object | None  # DAPO: (rewards, group_size) -> (keep mask, dropped groups)
    overlong_penalty: object | None  # DAPO: lengths -> reward shaping
    kl_beta: float
    kl_reward: object | None  # kl.placement=reward: (rewards, old, ref, mask) -> rewards
    momentum_update: object | None  # AAPO: EMA of the momentum model's weights
    greedy_rollout: bool = False  # ReMax: one greedy response per prompt, its reward the baseline
    mismatch_correction: bool = False  # the loss reweights tokens by pi_old / pi_rollout (needs Rollout.logprobs)
    entropy_bonus: bool = False  # loss.entropy_coef > 0: the loss trains on the differentiable entropy

    @classmethod
    def from_config(cls, a_cfg) -> "Algorithm":
        kl_beta = float(a_cfg.kl.beta)
        return cls(
            group_size=int(a_cfg.group_size),
            advantage_fn=instantiate(a_cfg.advantage),
            objective=instantiate(a_cfg.loss),
            token_mean=a_cfg.loss.aggregation.get("mode", "token-mean") == "token-mean",
            mask_truncated=bool(a_cfg.get("mask_truncated", False)),
            dynamic_sampling=instantiate(a_cfg.dynamic_sampling) if a_cfg.get("dynamic_sampling") else None,
            overlong_penalty=instantiate(a_cfg.overlong_penalty) if a_cfg.get("overlong_penalty") else None,
            kl_beta=kl_beta,
            kl_reward=instantiate(a_cfg.kl_reward) if a_cfg.kl.placement == "reward" and kl_beta > 0 else None,
            momentum_update=instantiate(a_cfg.momentum) if a_cfg.get("momentum") else None,
            greedy_rollout=bool(a_cfg.get("greedy_rollout", False)),
            mismatch_correction=a_cfg.loss.get("mismatch") is not None,
            entropy_bonus=float(a_cfg.loss.get("entropy_coef", 0.0) or 0.0) > 0,
        )

    def loss(self, update) -> PackedLoss:
        """The loss of one optimizer step's micro-batches (``update``: train/rl/update_batches.py UpdateBatch)."""
        return PackedLoss(self.objective, float(update.response_tokens if self.token_mean else update.samples),
                          self.entropy_bonus)

    def advantages(self, rewards: torch.Tensor, momentum_rewards: torch.Tensor | None = None,
                   greedy_rewards: torch.Tensor | None = None, response_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """[num_rollouts]; AAPO also reads the momentum model's rewards of the same prompts, ReMax the greedy
        responses' rewards ([num_rollouts], each prompt's repeated), REINFORCE++'s token whitening the lengths."""
        extra = {}
        if "response_lengths" in inspect.signature(self.advantage_fn).parameters:
            extra["response_lengths"] = response_lengths
        if momentum_rewards is not None:
            return self.advantage_fn(rewards, self.group_size, momentum_rewards, **extra)
        if greedy_rewards is not None:
            return self.advantage_fn(rewards, self.group_size, greedy_rewards, **extra)
        return self.advantage_fn(rewards, self.group_size, **extra)

    def step_advantages(self, rewards: torch.Tensor, batch) -> torch.Tensor:
        """The advantages of a step's rollouts (``batch``: train/rl/rounds.py StepBatch), [num_rollouts]."""
        lengths = torch.tensor([0 if self.mask_truncated and r.truncated else
                                sum(map(len, r.meta["turn_responses"])) if "turn_responses" in r.meta else len(r.response_ids)
                                for r in batch.rollouts])  # response tokens in the loss
        return self.advantages(rewards, batch.momentum_rewards, batch.greedy_rewards, lengths)

    def kl_into_rewards(self, rewards: torch.Tensor, updates, logprobs) -> torch.Tensor:
        """kl.placement=reward: r_i - beta * sum_t kl_it on the sampling-time log-probs; else the rewards."""
        if self.kl_reward is None:
            return rewards
        rewards = rewards.clone()
        for update, old, ref, masks in zip(updates, logprobs.old, logprobs.ref, logprobs.masks):
            for members, o, rf, mask in zip(update.members, old, ref, masks):
                rewards[members] = self.kl_reward(rewards[members], o, rf, mask)
        return rewards

    def needs_old_logprobs(self, optimizer_steps: int) -> bool:
        """pi_old needs its own forward only when the update cannot produce it: several optimizer steps per
        rollout batch (later ones see moved weights) or KL folded into the reward (needed before the
        advantages). With one step the update's own log-probs, detached, are exactly pi_old (as in TRL)."""
        return optimizer_steps > 1 or self.kl_reward is not None
