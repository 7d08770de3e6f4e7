"""The scalar RL objective: policy loss + optional KL in the loss, reduced by the configured aggregation.

An RL recipe builds it once from the algorithm config and calls it on every (micro-)batch::

    loss_fn = hydra.utils.instantiate(cfg.algorithm.loss)
    loss, metrics = loss_fn(logprobs, old_logprobs, advantages, response_mask, ref_logprobs=ref_logprobs)

Everything it needs is a tensor of shape [batch, resp_len] except ``advantages`` ([batch]).
"""

from __future__ import annotations

from typing import Callable

import torch

from algorithms.kl import ESTIMATORS, kl_estimate

PLACEMENTS = ("loss", "reward")


def policy_objective(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    policy_loss: Callable,
    aggregation: Callable,
    ref_logprobs: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    kl_estimator: str = "k3",
    kl_placement: str = "loss",
    kl_importance_weighted: bool = False,
    normalizer: float | torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    mismatch: Callable | None = None,
    rollout_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """loss = aggregate(w_{i,t} * policy_loss_{i,t} + beta * kl_{i,t} - entropy_coef * H_{i,t})
    (kl term only when kl_placement == "loss"; w = 1 without mismatch correction).

    This is GRPO's per-token objective (DeepSeekMath eq. 3) with the aggregation made explicit; TRL's
    GRPOTrainer computes the same sum (``per_token_loss + beta * per_token_kl``) before reducing.
    ``kl_importance_weighted``: multiply kl_{i,t} by the (differentiable) ratio pi/pi_old, which makes the
    k3 gradient the unbiased reverse-KL gradient off-policy (DeepSeek-V3.2, arXiv 2512.02556; TRL's
    ``use_bias_correction_kl``, default True there). False reproduces DeepSeekMath's GRPO.
    ``entropy_coef`` > 0 adds an entropy bonus (``entropy`` [batch, resp_len]: the differentiable entropy of
    pi(.|o_<t) at each response token; PPO, Schulman et al. 2017 eq. 9; verl ``entropy_coeff``).
    ``mismatch`` (``algorithms.mismatch.rollout_correction``) reweights or masks tokens by pi_old / pi_rollout,
    from ``rollout_logprobs`` [batch, resp_len] recorded by the sampler.
    With kl_placement == "reward" the recipe folds KL into the rewards (``algorithms.kl.kl_reward_penalty``)
    and this function only reports it. Metrics are detached scalars for logging.
    """
    if kl_placement not in PLACEMENTS:
        raise ValueError(f"algorithm.kl.placement must be one of {PLACEMENTS}, got {kl_placement!r}")
    if kl_estimator not in ESTIMATORS:
        raise ValueError(f"algorithm.kl.estimator must be one of {ESTIMATORS}, got {kl_estimator!r}")
    if kl_beta < 0:
        raise ValueError(f"algorithm.kl.beta must be >= 0, got {kl_beta}")
    if entropy_coef < 0:
        raise ValueError(f"algorithm.loss.entropy_coef must be >= 0 (a bonus), got {entropy_coef}")
    per_token_loss, metrics = policy_loss(logprobs, old_logprobs, advantages, response_mask)  # [batch, resp_len]
    metrics = dict(metrics)
    if mismatch is not None:
        if rollout_logprobs is None:
            raise ValueError("algorithm.loss.mismatch needs the sampler's log-probs (Rollout.logprobs); this rollout "
                             "backend records none: set algorithm.loss.mismatch=null")
        weights, mismatch_metrics = mismatch(old_logprobs, rollout_logprobs, response_mask)
        per_token_loss = per_token_loss * weights
        metrics.update(mismatch_metrics)
    if entropy_coef > 0:
        if entropy is None or entropy.shape != per_token_loss.shape:
            raise ValueError("algorithm.loss.entropy_coef > 0 needs the per-token entropy [batch, resp_len]")
        per_token_loss = per_token_loss - entropy_coef * entropy
    if kl_beta > 0:
        if ref_logprobs is None:
            raise ValueError("algorithm.kl.beta > 0 needs ref_logprobs from the reference model; pass them or set beta 0")
        per_token_kl = kl_estimate(logprobs, ref_logprobs, kl_estimator)  # [batch, resp_len]
        if kl_importance_weighted:
            per_token_kl = per_token_kl * torch.exp(logprobs - old_logprobs.detach())
        mask = response_mask.to(per_token_kl.dtype)
        metrics["kl"] = ((per_token_kl.detach() * mask).sum() / mask.sum().clamp(min=1.0))
        if kl_placement == "loss":
            per_token_loss = per_token_loss + kl_beta * per_token_kl
    loss = aggregation(per_token_loss, response_mask, normalizer=normalizer)
    metrics["policy_loss"] = loss.detach()
    return loss, metrics
