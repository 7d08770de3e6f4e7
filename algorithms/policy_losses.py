"""Per-token policy losses. Each returns (per_token_loss [batch, resp_len], metrics) and has the same call
signature, so an algorithm config can swap them:

    fn(logprobs, old_logprobs, advantages, response_mask) -> (per_token_loss, metrics)

``logprobs`` [batch, resp_len] carry the gradient; ``old_logprobs`` are the sampling-time log-probs
(pi_old); ``advantages`` is [batch] (broadcast to tokens) or [batch, resp_len]. Reduce the result with
``algorithms.aggregation.aggregate_loss``; add KL with ``algorithms.kl``.
"""

from __future__ import annotations

import torch


def _token_advantages(advantages: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    if advantages.dim() == 1:
        if advantages.shape[0] != logprobs.shape[0]:
            raise ValueError(f"advantages [{advantages.shape[0]}] do not match batch {logprobs.shape[0]}")
        return advantages.unsqueeze(1)  # [batch, 1], broadcasts over tokens
    if advantages.shape != logprobs.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [batch] or {tuple(logprobs.shape)}")
    return advantages


def _masked_mean(x: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    mask = response_mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate per token (Schulman et al. 2017; GRPO, DeepSeekMath 2402.03300).

        ratio = exp(logprobs - old_logprobs)
        loss  = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)

    eps_high > eps_low is DAPO's clip-higher (arXiv 2503.14476; paper: eps_low 0.2, eps_high 0.28).
    ``dual_clip`` = c > 1 adds dual-clip PPO (Ye et al., arXiv 1912.09729) for A < 0:
        loss = min(-min(ratio*A, clip(ratio)*A), -c * A)
    which bounds the loss when ratio >> 1 on a bad token. It equals TRL's ``delta`` (two-sided clipping,
    INTELLECT-2): both cap the ratio at c when A < 0 and leave A >= 0 unchanged, tested.
    """
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"algorithm.loss.policy_loss.eps_low/eps_high must be >= 0, got {eps_low}, {eps_high}")
    if dual_clip is not None and dual_clip <= 1.0 + eps_high:
        raise ValueError(
            f"algorithm.loss.policy_loss.dual_clip must be > 1 + eps_high ({1 + eps_high}) or null, got {dual_clip}"
        )
    adv = _token_advantages(advantages, logprobs)  # [batch, 1] or [batch, resp_len]
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)  # [batch, resp_len]
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(-ratio * adv, -clipped_ratio * adv)  # [batch, resp_len]
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    with torch.no_grad():
        metrics = {
            "clip_frac_low": _masked_mean(((ratio < 1 - eps_low) & (adv < 0)).float(), response_mask),
            "clip_frac_high": _masked_mean(((ratio > 1 + eps_high) & (adv > 0)).float(), response_mask),
            "ratio_mean": _masked_mean(ratio, response_mask),
        }
        if dual_clip is not None:
            metrics["clip_frac_dual"] = _masked_mean(((ratio > dual_clip) & (adv < 0)).float(), response_mask)
    return loss, metrics


def advantage_weighted_ce(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, dict]:
    """AAPO's advantage-weighted cross-entropy (arXiv 2505.14264; github JianxXiong/AAPO compute_loss).

        loss_{i,t} = -A_i * log pi(o_{i,t} | q, o_{i,<t})

    No ratio, no clipping (``old_logprobs`` is accepted for a uniform signature and ignored), so
    d loss / d theta = -A_i * grad log pi. The release reduces it with token-mean over the batch.
    """
    adv = _token_advantages(advantages, logprobs)
    loss = -adv * logprobs  # [batch, resp_len]
    return loss, {}
