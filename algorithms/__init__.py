"""Pure tensor functions for RL post-training: advantages, policy losses, KL, aggregation, filters, momentum.

How an RL recipe wires an algorithm config (configs/algorithm/{grpo,dapo,dr_grpo,rloo,aapo,gspo,cispo,reinforce_pp,
remax,gpg}.yaml)::

    from hydra.utils import instantiate
    alg = cfg.algorithm                                   # alg.recipe == "rl"; alg.group_size = G
    advantage_fn = instantiate(alg.advantage)             # (rewards [B], group_size[, momentum | greedy rewards [B]]) -> [B]
    loss_fn = instantiate(alg.loss)                       # see algorithms.objective.policy_objective
    dynamic_sampling = instantiate(alg.dynamic_sampling) if alg.dynamic_sampling else None
    overlong = instantiate(alg.overlong_penalty) if alg.overlong_penalty else None
    ema = instantiate(alg.momentum) if alg.momentum else None
    kl_reward = instantiate(alg.kl_reward) if alg.kl.placement == "reward" and alg.kl.beta > 0 else None

    # per rollout batch (B = num_prompts * G, groups contiguous):
    if overlong:          rewards = rewards + overlong(response_lengths)                  # [B]
    if kl_reward:         rewards = kl_reward(rewards, old_logprobs, ref_logprobs, response_mask)
    if dynamic_sampling:  keep, num_dropped = dynamic_sampling(rewards, G)                # log num_dropped; refill
    if alg.mask_truncated: response_mask = algorithms.group_filters.mask_truncated(response_mask, truncated)
    advantages = advantage_fn(rewards, G, momentum_rewards) if alg.momentum_rollout else advantage_fn(rewards, G)
    #   (ReMax: advantage_fn(rewards, G, greedy_rewards); REINFORCE++ token whitening: response_lengths=[B])
    # per (micro-)batch update, tensors [b, T]; normalizer = global token/response count when accumulating:
    loss, metrics = loss_fn(logprobs, old_logprobs, advantages, response_mask, ref_logprobs=ref_logprobs,
                            entropy=entropy, rollout_logprobs=rollout_logprobs)  # entropy bonus / mismatch correction
    # after each optimizer step (AAPO):
    if ema: ema(momentum_model.parameters(), policy.parameters(), step=step)

Pass ``ref_logprobs`` only when ``alg.kl.beta > 0`` (otherwise no reference forward is needed). Log
``alg.loss.aggregation.mode`` with the run config: it fixes how tokens and responses are weighted.
"""

from algorithms.advantages import (
    aapo_advantages,
    gpg_advantages,
    group_relative_advantages,
    passk_advantages,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
)
from algorithms.aggregation import aggregate_loss
from algorithms.group_filters import dynamic_sampling_mask, mask_truncated, overlong_penalty
from algorithms.kl import kl_estimate, kl_reward_penalty
from algorithms.mismatch import rollout_correction
from algorithms.momentum import ema_update
from algorithms.objective import policy_objective
from algorithms.policy_losses import advantage_weighted_ce, cispo, clip_cov, clipped_surrogate, gspo, kl_cov

__all__ = [
    "aapo_advantages",
    "advantage_weighted_ce",
    "aggregate_loss",
    "cispo",
    "clip_cov",
    "clipped_surrogate",
    "dynamic_sampling_mask",
    "ema_update",
    "gpg_advantages",
    "group_relative_advantages",
    "gspo",
    "kl_cov",
    "kl_estimate",
    "kl_reward_penalty",
    "mask_truncated",
    "overlong_penalty",
    "passk_advantages",
    "policy_objective",
    "reinforce_pp_advantages",
    "remax_advantages",
    "rloo_advantages",
    "rollout_correction",
]
