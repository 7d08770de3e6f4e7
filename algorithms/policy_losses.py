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


def _check_clip(eps_low: float, eps_high: float) -> None:
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"algorithm.loss.policy_loss.eps_low/eps_high must be >= 0, got {eps_low}, {eps_high}")


def _clip_loss(ratio, adv, response_mask, eps_low: float, eps_high: float) -> tuple[torch.Tensor, dict]:
    """-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) per token, and the clipped fractions."""
    loss = torch.maximum(-ratio * adv, -ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)  # [batch, resp_len]
    with torch.no_grad():
        metrics = {
            "clip_frac_low": _masked_mean(((ratio < 1 - eps_low) & (adv < 0)).float(), response_mask),
            "clip_frac_high": _masked_mean(((ratio > 1 + eps_high) & (adv > 0)).float(), response_mask),
            "ratio_mean": _masked_mean(ratio, response_mask),
        }
    return loss, metrics


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
    _check_clip(eps_low, eps_high)
    if dual_clip is not None and dual_clip <= 1.0 + eps_high:
        raise ValueError(
            f"algorithm.loss.policy_loss.dual_clip must be > 1 + eps_high ({1 + eps_high}) or null, got {dual_clip}"
        )
    adv = _token_advantages(advantages, logprobs)  # [batch, 1] or [batch, resp_len]
    ratio = torch.exp(logprobs - old_logprobs.detach())  # [batch, resp_len]
    loss, metrics = _clip_loss(ratio, adv, response_mask, eps_low, eps_high)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
        metrics["clip_frac_dual"] = _masked_mean(((ratio > dual_clip) & (adv < 0)).float().detach(), response_mask)
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
    It is also GPG's loss (Chu et al., arXiv 2504.02546: "no surrogate", plain policy gradient; verl
    ``compute_policy_loss_gpg`` is the same -log pi * A), paired there with ``algorithms.advantages.gpg_advantages``.
    """
    adv = _token_advantages(advantages, logprobs)
    loss = -adv * logprobs  # [batch, resp_len]
    return loss, {}


def gspo(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
         response_mask: torch.Tensor, *, eps_low: float = 3e-4, eps_high: float = 4e-4) -> tuple[torch.Tensor, dict]:
    """GSPO, Group Sequence Policy Optimization (Zheng et al., Qwen team, arXiv 2507.18071), token form GSPO-token.

        s_i   = (pi(o_i|q) / pi_old(o_i|q))^(1/|o_i|) = exp(1/|o_i| * sum_t (log pi_it - log pi_old_it))
        s_it  = sg[s_i] * pi_it / sg[pi_it]                              (GSPO-token, eq. in sec. 4.3)
        loss_it = -min(s_it * A_it, clip(s_it, 1 - eps_low, 1 + eps_high) * A_it)

    The ratio is length-normalised over the sequence and clipped as a whole: every token of response i has
    the value s_i, so a response is clipped entirely or not at all. With one advantage per response (A_it = A_i)
    GSPO-token has exactly GSPO's value and gradient (s_i * A_i * mean_t grad log pi_it once the tokens are
    averaged per sequence), so this one function is both; pair it with ``seq-mean-token-mean`` aggregation
    (the paper's 1/G sum_i, as verl's ``compute_policy_loss_gspo`` forces). Defaults are the paper's clip
    range (left 3e-4, right 4e-4: sequence ratios stay near 1). log s_it is capped at 10 before exp, as in verl.
    """
    _check_clip(eps_low, eps_high)
    adv = _token_advantages(advantages, logprobs)  # [batch, 1] or [batch, resp_len]
    mask = response_mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs.detach()) * mask  # [batch, resp_len]
    seq_log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)  # [batch, 1]
    log_s = (seq_log_ratio.detach() + logprobs - logprobs.detach()).clamp(max=10.0)  # [batch, resp_len]
    return _clip_loss(torch.exp(log_s), adv, response_mask, eps_low, eps_high)


def cispo(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
          response_mask: torch.Tensor, *, eps_low: float = 1.0, eps_high: float = 0.28) -> tuple[torch.Tensor, dict]:
    """CISPO, clipped IS-weight policy optimisation (MiniMax-M1, arXiv 2506.13585, sec. 3.1 eq. 4-5).

        r_it      = pi_it / pi_old_it
        loss_it   = -sg[clip(r_it, 1 - eps_low, 1 + eps_high)] * A_it * log pi_it

    The importance weight is clipped and detached instead of the update: every token keeps the gradient
    A * w * grad log pi (PPO's clip zeroes it for tokens outside the range, often the rare "wait" / "recheck"
    forks of long reasoning). The paper sets eps_low large (no lower bound: eps_low = 1 means w >= 0) and tunes
    eps_high without publishing it; 0.28 (DAPO's clip-higher) is our default. Same as verl's
    ``compute_policy_loss_cispo`` (tested). ``clip_frac`` is the fraction of tokens whose weight was clipped.
    """
    _check_clip(eps_low, eps_high)
    adv = _token_advantages(advantages, logprobs)
    ratio = torch.exp(logprobs.detach() - old_logprobs.detach())  # [batch, resp_len], no gradient
    weight = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = -weight * adv * logprobs  # [batch, resp_len]
    with torch.no_grad():
        metrics = {"clip_frac": _masked_mean((weight != ratio).float(), response_mask),
                   "ratio_mean": _masked_mean(ratio, response_mask)}
    return loss, metrics


def _covariance(logprobs: torch.Tensor, adv: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-token centred product (A_it - mean A)(log pi_it - mean log pi) over the valid tokens (detached)."""
    adv = adv.expand_as(logprobs).detach()
    lp = logprobs.detach()
    return (adv - adv[valid].mean()) * (lp - lp[valid].mean())  # [batch, resp_len]


def clip_cov(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
             *, eps_low: float = 0.2, eps_high: float = 0.2, clip_ratio: float = 2e-4, cov_lb: float = 1.0,
             cov_ub: float = 5.0) -> tuple[torch.Tensor, dict]:
    """Clip-Cov (Cui et al., "The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617, sec. 4).

        Cov_it  = (A_it - mean(A)) * (log pi_it - mean(log pi))          means over the batch's tokens
        pick    max(1, floor(clip_ratio * N)) tokens at random among those with cov_lb < Cov_it < cov_ub
                (and not already clipped by PPO's range); their loss is detached (no gradient)
        loss_it = -min(r_it A_it, clip(r_it) A_it) * (0 if picked else 1)

    Entropy collapses because tokens with a large covariance between log-prob and advantage drive it down;
    stopping their gradient keeps entropy up. Defaults are the paper's (r = 2e-4, omega_low 1, omega_high 5).
    The means are over the micro-batch the loss sees (verl: the same, per micro-batch). The random pick uses
    torch's global generator (seeded by the trainer). Same as verl's ``compute_policy_loss_clip_cov``.
    """
    _check_clip(eps_low, eps_high)
    if clip_ratio <= 0 or cov_lb >= cov_ub:
        raise ValueError(f"algorithm.loss.policy_loss: clip_ratio={clip_ratio} must be > 0 and "
                         f"cov_lb={cov_lb} < cov_ub={cov_ub}")
    adv = _token_advantages(advantages, logprobs)
    ratio = torch.exp(logprobs - old_logprobs.detach())
    loss, metrics = _clip_loss(ratio, adv, response_mask, eps_low, eps_high)
    valid = response_mask.bool()
    keep = torch.ones_like(loss)
    if valid.any():
        clipped = (-ratio.clamp(1 - eps_low, 1 + eps_high) * adv > -ratio * adv).detach()
        cov = _covariance(logprobs, adv, valid)
        candidates = ((cov > cov_lb) & (cov < cov_ub) & valid & ~clipped).nonzero()  # [n, 2]
        count = max(int(clip_ratio * int(valid.sum())), 1)
        picked = candidates[torch.randperm(len(candidates))[:count].to(candidates.device)]
        keep[picked[:, 0], picked[:, 1]] = 0.0
    metrics["cov_clip_frac"] = _masked_mean((keep == 0).float(), response_mask)
    return loss * keep, metrics


def kl_cov(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
           response_mask: torch.Tensor, *, kl_ratio: float = 2e-3, kl_coef: float = 1.0) -> tuple[torch.Tensor, dict]:
    """KL-Cov (Cui et al., arXiv 2505.22617, sec. 4): a KL penalty on the tokens of largest covariance only.

        Cov_it  = (A_it - mean(A)) * (log pi_it - mean(log pi))          means over the batch's tokens
        top     = the max(1, floor(kl_ratio * N)) tokens of largest Cov_it
        loss_it = -r_it A_it + (kl_coef * |log pi_it - log pi_old_it| if (i,t) in top else 0)

    No ratio clipping: the penalty on the high-covariance tokens replaces it. Paper defaults: k = 2e-3
    (Qwen2.5-7B; 2e-4 for 32B), beta = 1. Same as verl's ``compute_policy_loss_kl_cov``.
    """
    if kl_ratio <= 0 or kl_coef < 0:
        raise ValueError(f"algorithm.loss.policy_loss: kl_ratio={kl_ratio} must be > 0 and kl_coef={kl_coef} >= 0")
    adv = _token_advantages(advantages, logprobs)
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    valid = response_mask.bool()
    penalised = torch.zeros_like(log_ratio, dtype=torch.bool)
    if valid.any():
        cov = _covariance(logprobs, adv, valid)
        count = max(1, int(int(valid.sum()) * kl_ratio))
        top = cov[valid].topk(count).indices
        penalised[valid.nonzero()[top].unbind(1)] = True
    loss = -ratio * adv + kl_coef * log_ratio.abs() * penalised
    with torch.no_grad():
        metrics = {"cov_kl_frac": _masked_mean(penalised.float(), response_mask),
                   "ratio_mean": _masked_mean(ratio, response_mask)}
    return loss, metrics
