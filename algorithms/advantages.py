"""Advantage estimators: one scalar per response, broadcast to its tokens by the policy loss.

Contract: ``rewards`` is [batch] with groups contiguous (sample i answers prompt i // group_size).
Every estimator fails early on a batch that is not a whole number of groups, on group_size < 2
and on non-finite rewards.
"""

from __future__ import annotations

import math

import torch

SCALES = ("group", "batch", "none")


def _check(rewards: torch.Tensor, group_size: int, name: str = "rewards", min_group: int = 2) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"{name} must be a 1-D [batch] tensor, got shape {tuple(rewards.shape)}")
    if group_size < min_group:
        raise ValueError(
            f"algorithm.group_size (responses per prompt) must be >= {min_group} for this baseline, got {group_size}; "
            f"sample at least {min_group} responses per prompt"
        )
    if rewards.numel() % group_size:
        raise ValueError(
            f"batch of {rewards.numel()} {name} is not a whole number of groups of algorithm.group_size={group_size}; "
            "keep groups contiguous and complete"
        )
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()[:8]
        raise ValueError(
            f"non-finite {name} at batch indices {bad}; the reward function that produced them must return "
            "finite floats (rewards.registry names the component when it computes them)"
        )
    return rewards.view(-1, group_size)


def group_relative_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """GRPO group-relative advantage (DeepSeekMath, arXiv 2402.03300, eq. in sec. 4.1.2).

        A_i = (r_i - mean_g(r)) / (std + eps)

    ``scale``: "group" -> std over the G responses of the prompt (GRPO); "batch" -> std over the whole
    batch (Dr.GRPO discussion / TRL ``scale_rewards="batch"``); "none" -> no division (Dr.GRPO,
    arXiv 2503.20783). std is the unbiased (Bessel-corrected) estimate and eps = 1e-4, as in TRL's
    GRPOTrainer and the AAPO release, so advantages match TRL bit for bit. A group whose rewards are all
    equal gets A = 0.
    """
    if scale not in SCALES:
        raise ValueError(f"algorithm.advantage.scale must be one of {SCALES}, got {scale!r}")
    grouped = _check(rewards, group_size)  # [num_groups, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [num_groups, G]
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)
    return centred.reshape(-1)  # [batch]


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out baseline (RLOO; Kool et al. 2019, Ahmadian et al. arXiv 2402.14740).

        A_i = r_i - 1/(G-1) * sum_{j != i} r_j  =  G/(G-1) * (r_i - mean_g(r))

    Unbiased, no std scaling, no extra model.
    """
    grouped = _check(rewards, group_size)  # [num_groups, G]
    # the G/(G-1) form keeps all-equal groups at exactly 0 (the sum-minus-self form leaves rounding noise)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [num_groups, G]
    return (centred * (group_size / (group_size - 1))).reshape(-1)  # [batch]


def aapo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    momentum_rewards: torch.Tensor,
    *,
    scale: str = "group",
    eps: float = 1e-4,
    c_low: float = 0.2,
    c_high: float = 0.28,
) -> torch.Tensor:
    """AAPO advantage with advantage momentum (Xiong et al., arXiv 2505.14264).

        A_i = group_relative(r)_i + clip(r_i - r^m_i, -c_low, c_high)

    r^m_i is the reward of the i-th response sampled from the momentum model for the same prompt
    (same reward functions and weights). Defaults follow the authors' release (github JianxXiong/AAPO,
    ``open-rs/trainer/AAPOTrainer.py``): group std scaling with eps 1e-4, unbiased std, and
    ``torch.clamp(r - r_ref, -0.2, 0.28)``, so c_low = 0.2 and c_high = 0.28. When all G rewards are
    equal the group term is 0 and the momentum term alone carries the signal.
    """
    if c_low < 0 or c_high < 0:
        raise ValueError(f"algorithm.advantage.c_low/c_high must be >= 0, got {c_low}, {c_high}")
    if momentum_rewards is None or momentum_rewards.shape != rewards.shape:
        got = None if momentum_rewards is None else tuple(momentum_rewards.shape)
        raise ValueError(
            f"AAPO needs momentum_rewards of shape {tuple(rewards.shape)} (one momentum-model response per policy "
            f"response), got {got}; set algorithm.momentum_rollout: true so the recipe samples them"
        )
    _check(momentum_rewards, group_size, name="momentum_rewards")
    group_term = group_relative_advantages(rewards, group_size, scale=scale, eps=eps)  # [batch]
    momentum_term = (rewards - momentum_rewards).clamp(-c_low, c_high)  # [batch]
    return group_term + momentum_term


def _whiten(values: torch.Tensor, weights: torch.Tensor | None, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with the unbiased variance; ``weights`` [batch] counts each value that many
    times (its response's tokens), as a token-level masked whitening of a per-response constant does. Fewer than 2
    counted values: zeros."""
    w = torch.ones_like(values) if weights is None else weights.to(values.dtype)
    n = w.sum()
    if n < 2:  # e.g. every response truncated under mask_truncated: nothing in the loss to learn from
        return torch.zeros_like(values)
    mean = (w * values).sum() / n
    var = (w * (values - mean).square()).sum() / (n - 1)
    return (values - mean) * torch.rsqrt(var + eps)


def reinforce_pp_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    baseline: str = "group",
    whiten: str = "tokens",
    response_lengths: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++ (Hu et al., arXiv 2501.03262): global batch normalisation of the advantage, no critic.

        baseline "none"  (REINFORCE++):          A_i = r_i                     then whitened over the batch
        baseline "group" (REINFORCE++-baseline): A_i = r_i - mean_g(r)         then whitened over the batch
        whitened:  A <- (A - mean_batch(A)) / sqrt(var_batch(A) + eps)

    Outcome rewards only (one scalar per response, gamma = 1: every token's return is r_i; a KL penalty can be
    folded into r_i with ``algorithm.kl.placement=reward``). ``whiten`` "tokens" weights each response by its
    number of response tokens (``response_lengths`` [batch], passed by the recipe), as OpenRLHF and verl whiten
    the token-level advantages (verl ``compute_reinforce_plus_plus_baseline_outcome_advantage``, equal, tested);
    "responses" counts each response once (the paper's batch mean and std). Unbiased variance, eps 1e-8 (verl).
    """
    if baseline not in ("none", "group"):
        raise ValueError(f"algorithm.advantage.baseline must be none or group, got {baseline!r}")
    if whiten not in ("tokens", "responses"):
        raise ValueError(f"algorithm.advantage.whiten must be tokens or responses, got {whiten!r}")
    grouped = _check(rewards, group_size, min_group=1 if baseline == "none" else 2)  # [num_groups, G]
    if baseline == "group":
        grouped = grouped - grouped.mean(dim=1, keepdim=True)
    weights = None
    if whiten == "tokens":
        if response_lengths is None or response_lengths.shape != rewards.shape:
            raise ValueError("algorithm.advantage.whiten=tokens needs response_lengths [batch] (the recipe passes them); "
                             "set algorithm.advantage.whiten=responses to count each response once")
        weights = response_lengths
    return _whiten(grouped.reshape(-1), weights, eps)  # [batch]


def remax_advantages(rewards: torch.Tensor, group_size: int, greedy_rewards: torch.Tensor) -> torch.Tensor:
    """ReMax (Li et al., arXiv 2310.10505, Algorithm 1): the greedy response's reward as the baseline.

        A_i = r_i - r(greedy response to the prompt of i)

    ``greedy_rewards`` [batch] (one per sampled response: its prompt's greedy reward repeated, as the recipe
    passes it). Any group size (the paper samples one response per prompt). verl ``compute_remax_outcome_advantage``
    computes the same for outcome rewards (tested).
    """
    _check(rewards, group_size, min_group=1)
    if greedy_rewards is None or greedy_rewards.shape != rewards.shape:
        got = None if greedy_rewards is None else tuple(greedy_rewards.shape)
        raise ValueError(f"ReMax needs greedy_rewards of shape {tuple(rewards.shape)}, got {got}; set "
                         "algorithm.greedy_rollout: true so the recipe samples one greedy response per prompt")
    _check(greedy_rewards, group_size, name="greedy_rewards", min_group=1)
    return rewards - greedy_rewards


def gpg_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "none", alpha: str = "valid", eps: float = 1e-4
) -> torch.Tensor:
    """GPG, Group Policy Gradient (Chu et al., arXiv 2504.02546, eq. 8-10): a group baseline and a correction factor.

        A_i = alpha * (r_i - mean_g(r)) / F_norm          F_norm = 1 (scale none) or std_g(r) + eps (scale group)
        alpha = B / B_valid                                 B_valid: responses in groups whose rewards differ

    Groups with all-equal rewards have A = 0 yet count in the batch mean of the loss; alpha scales the gradient
    back to the valid responses ("accurate gradient estimation"). The release (github AMAP-ML/GPG,
    ``open_r1/gpg_trainer.py``) computes inverse_alpha = valid / all and runs with ``scale_rewards False``. verl's
    ``compute_gpg_outcome_advantage`` uses alpha = B / (number of non-zero rewards) instead: ``alpha: nonzero``
    reproduces it (tested); ``alpha: none`` is 1. Pair with ``advantage_weighted_ce`` (-A log pi, no ratio).
    """
    if scale not in ("none", "group"):
        raise ValueError(f"algorithm.advantage.scale must be none or group for GPG, got {scale!r}")
    if alpha not in ("valid", "nonzero", "none"):
        raise ValueError(f"algorithm.advantage.alpha must be valid, nonzero or none, got {alpha!r}")
    grouped = _check(rewards, group_size)  # [num_groups, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    if alpha == "valid":
        valid = (grouped.max(dim=1).values > grouped.min(dim=1).values).sum() * group_size
        centred = centred * (rewards.numel() / valid.clamp(min=1).to(centred.dtype))
    elif alpha == "nonzero":
        centred = centred * (rewards.numel() / torch.count_nonzero(rewards).clamp(min=1).to(centred.dtype))
    return centred.reshape(-1)  # [batch]


def passk_advantages(rewards: torch.Tensor, group_size: int, *, k: int, threshold: float = 1.0) -> torch.Tensor:
    """Pass@k advantages in closed form (Chen et al., "Pass@k Training ...", arXiv 2508.10751, sec. 3.3).

    A response is a success when r_i >= ``threshold``. In a group of N = G responses with N_neg failures, the
    expected pass@k reward of a random k-subset and its std are

        R_mean = 1 - C(N_neg, k) / C(N, k)            sigma = sqrt(R_mean * (1 - R_mean))
        A_pos  = (1 - R_mean) / sigma
        A_neg  = (1 - R_mean - C(N_neg - 1, k - 1) / C(N - 1, k - 1)) / sigma

    the advantage every success / failure gets when the group is split into all k-subsets, each rewarded by
    max over its members (the paper's analytical derivation of bootstrap pass@k training). k = 1 gives GRPO's
    (r - mean) / std with the biased std. A group that is all success or all failure gets 0.
    """
    if not 1 <= k <= group_size:
        raise ValueError(f"algorithm.advantage.k={k} must be in [1, algorithm.group_size={group_size}]")
    grouped = _check(rewards, group_size)
    success = (grouped >= threshold).to(torch.float64)  # [num_groups, G]
    n = group_size
    n_neg = n - success.sum(dim=1)  # [num_groups]
    comb = torch.tensor([math.comb(j, k) for j in range(n + 1)], dtype=torch.float64)  # C(j, k), j = 0..N
    comb_less = torch.tensor([math.comb(max(j - 1, 0), k - 1) if j >= 1 else 0 for j in range(n + 1)],
                             dtype=torch.float64)  # C(j - 1, k - 1)
    idx = n_neg.long()
    r_mean = 1.0 - comb[idx] / math.comb(n, k)
    sigma = (r_mean * (1.0 - r_mean)).sqrt()
    a_pos = (1.0 - r_mean) / sigma
    a_neg = (1.0 - r_mean - comb_less[idx] / math.comb(n - 1, k - 1)) / sigma
    adv = torch.where(success.bool(), a_pos[:, None], a_neg[:, None])
    adv = torch.where((sigma > 0)[:, None], adv, torch.zeros_like(adv))
    return adv.reshape(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)
