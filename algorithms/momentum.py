"""Momentum (EMA) model update for AAPO's advantage momentum (arXiv 2505.14264).

    every `period` steps:  theta_m <- alpha * theta_m + (1 - alpha) * theta_policy

alpha = 1 keeps the momentum model frozen at its initial weights: that is what the authors' released
code does (JianxXiong/AAPO generates the momentum responses with TRL's reference model and leaves
``sync_ref_model`` at its default False), so it is our default. TRL's ``SyncRefModelCallback``
(TR-DPO, arXiv 2404.09656) writes the same update with the weight on the *policy*:
theta_ref <- a * theta + (1 - a) * theta_ref, defaults a = 0.6 every 512 steps; TRL's a is 1 - alpha here.
Operates on parameter iterables or state dicts; no model classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def _tensors(params) -> list[torch.Tensor]:
    if isinstance(params, Mapping):
        return list(params.values())
    if isinstance(params, torch.nn.Module):
        raise TypeError("pass module.parameters() or module.state_dict(), not the module itself")
    return list(params)


@torch.no_grad()
def ema_update(
    momentum_params: Iterable[torch.Tensor] | Mapping[str, torch.Tensor],
    policy_params: Iterable[torch.Tensor] | Mapping[str, torch.Tensor],
    *,
    step: int,
    alpha: float = 1.0,
    period: int = 1,
) -> bool:
    """Update ``momentum_params`` in place when ``step % period == 0``; returns whether it updated.

    ``step`` is the optimizer step just completed (1-based is natural: step 0 never updates a fresh copy
    differently, since theta_m == theta then). Floating tensors are blended; integer buffers are copied.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"algorithm.momentum.alpha must be in [0, 1] (1 = frozen), got {alpha}")
    if period < 1:
        raise ValueError(f"algorithm.momentum.period must be >= 1 step, got {period}")
    if alpha == 1.0 or step % period:
        return False
    targets, sources = _tensors(momentum_params), _tensors(policy_params)
    if len(targets) != len(sources):
        raise ValueError(f"momentum model has {len(targets)} tensors, policy has {len(sources)}; they must match")
    for target, source in zip(targets, sources):
        if target.shape != source.shape:
            raise ValueError(f"momentum tensor {tuple(target.shape)} != policy tensor {tuple(source.shape)}")
        src = source.detach().to(device=target.device)
        if target.is_floating_point():
            target.mul_(alpha).add_(src.to(target.dtype), alpha=1.0 - alpha)
        else:
            target.copy_(src)
    return True
