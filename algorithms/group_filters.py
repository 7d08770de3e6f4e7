"""Group filters and reward shaping from DAPO (arXiv 2503.14476) that act on whole rollout batches.

- ``dynamic_sampling_mask``: keep only groups whose rewards are not all equal (their group-relative
  advantage is 0 and they teach nothing); the recipe refills the batch with new prompts.
- ``overlong_penalty``: soft length penalty over the last ``cache_len`` tokens of the budget (DAPO eq. 13).
- ``mask_truncated``: drop responses cut by the budget from the loss (DAPO "overlong filtering").
"""

from __future__ import annotations

import torch


def dynamic_sampling_mask(
    rewards: torch.Tensor, group_size: int, *, tolerance: float = 0.0
) -> tuple[torch.Tensor, int]:
    """(keep [batch] bool, number of dropped groups): drop groups with max(r) - min(r) <= tolerance.

    DAPO sec. 3.2: keep a prompt only if 0 < #correct < G, i.e. its rewards are not all equal.
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"batch of {rewards.numel()} rewards is not a whole number of groups of algorithm.group_size={group_size}"
        )
    grouped = rewards.view(-1, group_size)  # [num_groups, G]
    spread = grouped.max(dim=1).values - grouped.min(dim=1).values  # [num_groups]
    keep_group = spread > tolerance  # [num_groups]
    keep = keep_group.repeat_interleave(group_size)  # [batch]
    return keep, int((~keep_group).sum().item())


def overlong_penalty(
    response_lengths: torch.Tensor, *, max_response_len: int, cache_len: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the reward -> [batch] (values in [-factor, 0]).

        R(L) = 0                               if L <= L_max - L_cache
             = ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
             = -1                              if L > L_max
    (DAPO paper: L_max = 20480 with L_cache = 4096 of it, i.e. expected length 16384.)
    """
    if not 0 < cache_len <= max_response_len:
        raise ValueError(
            f"algorithm.overlong_penalty.cache_len must be in (0, max_response_len={max_response_len}], got {cache_len}"
        )
    lengths = response_lengths.to(torch.float32)
    expected = max_response_len - cache_len
    ramp = (expected - lengths) / cache_len  # [batch]
    penalty = torch.where(lengths <= expected, torch.zeros_like(lengths), ramp)
    penalty = torch.where(lengths > max_response_len, torch.full_like(lengths, -1.0), penalty)
    return factor * penalty


def mask_truncated(response_mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """DAPO overlong filtering (sec. 3.4): a response cut by the budget (no EOS) gets no loss.

        m'_{i,t} = m_{i,t} * (1 - truncated_i)       -> [batch, resp_len], the dtype of ``response_mask``
    """
    if truncated.shape != response_mask.shape[:1]:
        raise ValueError(f"truncated must be [batch]={response_mask.shape[0]}, got {tuple(truncated.shape)}")
    return response_mask * (~truncated.bool()).unsqueeze(1).to(response_mask.dtype)
