"""KL(pi || pi_ref) estimators per token (Schulman, "Approximating KL divergence", 2020).

With log_ratio = log pi - log pi_ref on tokens sampled from pi:
    k1 = log_ratio                          (unbiased, high variance, can be negative)
    k2 = 0.5 * log_ratio**2                 (biased, low variance)
    k3 = exp(-log_ratio) + log_ratio - 1    (= pi_ref/pi - log(pi_ref/pi) - 1; unbiased, >= 0; GRPO's choice,
                                             DeepSeekMath eq. 4, TRL GRPOTrainer)
k1 and k3 have the right expected value but not the right expected gradient as loss terms on samples of pi:
the pathwise gradient of k1 is grad log pi (expectation 0), that of k3 is (1 - pi_ref/pi) grad log pi, whose
expectation is the gradient of the *forward* KL(pi_ref || pi). k2's, log_ratio * grad log pi, has the expectation
grad KL(pi || pi_ref) (Schulman's note; verl ``kl_penalty``). The straight-through forms
    k1+ / k3+ = k2 - sg(k2) + sg(k1 / k3)      (value of k1 / k3, gradient of k2)
report the unbiased value and train with the correct gradient (verl's "k3+" / "low_var_kl+", equal, tested).
The coefficient beta multiplies the estimate either in the loss (GRPO) or in the reward (PPO-style
"KL in reward", via ``kl_reward_penalty``). beta = 0 disables the reference model altogether.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("k1", "k2", "k3", "k1+", "k3+")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate [batch, resp_len]; gradients flow through ``logprobs`` only."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"algorithm.kl.estimator must be one of {ESTIMATORS}, got {estimator!r}")
    log_ratio = logprobs - ref_logprobs.detach()  # [batch, resp_len]
    if estimator.endswith("+"):  # straight-through: forward value of k1/k3, backward gradient of k2
        k2 = 0.5 * log_ratio.square()
        return k2 - k2.detach() + kl_estimate(logprobs, ref_logprobs, estimator[:-1]).detach()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.exp(-log_ratio) + log_ratio - 1.0


def kl_reward_penalty(
    rewards: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    beta: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """KL folded into the reward before advantages: r_i <- r_i - beta * sum_t kl_{i,t}  -> [batch].

    Computed on the sampling-time log-probs (no gradient), as in PPO-RLHF (Ouyang et al. 2022).
    """
    with torch.no_grad():
        per_token = kl_estimate(logprobs.detach(), ref_logprobs, estimator) * response_mask  # [batch, resp_len]
        return rewards - beta * per_token.sum(dim=-1)
