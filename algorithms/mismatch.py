"""Rollout/trainer mismatch correction: the engine that sampled (vLLM, bf16 kernels, another batch layout) gives
the sampled tokens other probabilities than the trainer's forward at the same weights, so "on-policy" updates are
silently off-policy. Per token, with pi_old the trainer's probability under the weights that sampled and
pi_rollout the sampler's own (recorded with each rollout):

    w_it = pi_old(o_it) / pi_rollout(o_it) = exp(old_logprobs - rollout_logprobs)

    mode "tis"   truncated importance sampling: the policy loss of each token times sg[min(w_it, threshold)]
                 (Yao et al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training", 2025;
                 verl ``compute_rollout_correction_weights`` token mode, threshold 2)
    mode "mask"  drop the tokens whose mismatch is large: weight 1 when 1/threshold <= w_it <= threshold, else 0
                 (masked importance sampling; verl's token rejection sampling)

Metrics: ``mismatch_kl``, the k3 estimate of KL(pi_rollout || pi_old) on the sampled tokens (>= 0; 0 when the
engines agree), and ``mismatch_weight_clip_frac``, the fraction of tokens truncated (tis) or masked (mask).
"""

from __future__ import annotations

import torch

MODES = ("tis", "mask")


def rollout_correction(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    mode: str = "tis",
    threshold: float = 2.0,
) -> tuple[torch.Tensor, dict]:
    """(weights [batch, resp_len], detached, to multiply the per-token policy loss; metrics)."""
    if mode not in MODES:
        raise ValueError(f"algorithm.loss.mismatch.mode must be one of {MODES}, got {mode!r}")
    if threshold <= 1.0:
        raise ValueError(f"algorithm.loss.mismatch.threshold must be > 1 (a bound on pi_old / pi_rollout), got {threshold}")
    if rollout_logprobs.shape != old_logprobs.shape:
        raise ValueError(f"rollout_logprobs {tuple(rollout_logprobs.shape)} must match old_logprobs {tuple(old_logprobs.shape)}")
    with torch.no_grad():
        log_w = (old_logprobs.detach() - rollout_logprobs).clamp(-20.0, 20.0)  # [batch, resp_len]
        w = torch.exp(log_w)
        if mode == "tis":
            outside = w > threshold
            weights = w.clamp(max=threshold)
        else:
            outside = (w > threshold) | (w < 1.0 / threshold)
            weights = (~outside).to(w.dtype)
        mask = response_mask.to(w.dtype)
        count = mask.sum().clamp(min=1.0)
        metrics = {
            "mismatch_kl": ((w - 1.0 - log_w) * mask).sum() / count,
            "mismatch_weight_clip_frac": (outside.to(w.dtype) * mask).sum() / count,
        }
    return weights * mask, metrics
