"""Advantage estimators: one scalar per response, broadcast to its tokens by the policy loss.

Contract: ``rewards`` is [batch] with groups contiguous (sample i answers prompt i // group_size).
Every estimator fails early on a batch that is not a whole number of groups, on group_size < 2
and on non-finite rewards.
"""

from __future__ import annotations

import torch

SCALES = ("group", "batch", "none")


def _check(rewards: torch.Tensor, group_size: int, name: str = "rewards") -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"{name} must be a 1-D [batch] tensor, got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(
            f"algorithm.group_size (responses per prompt) must be >= 2 for a group baseline, got {group_size}; "
            "sample at least 2 responses per prompt"
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
