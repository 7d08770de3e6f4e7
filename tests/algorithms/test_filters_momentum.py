"""DAPO group filters and shaping, and the momentum-model EMA, against hand-computed values."""

import pytest
import torch

from algorithms.group_filters import dynamic_sampling_mask, mask_truncated, overlong_penalty
from algorithms.momentum import ema_update


def test_dynamic_sampling_drops_zero_variance_groups_and_counts_them():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])  # groups of 2: keep, keep? no:
    keep, dropped = dynamic_sampling_mask(rewards, 2)
    # groups: [1,1] drop, [0,1] keep, [0,0] drop, [0.5,0.5] drop
    assert keep.tolist() == [False, False, True, True, False, False, False, False]
    assert dropped == 3


def test_overlong_penalty_reference():
    lengths = torch.tensor([10, 12, 14, 16, 17])
    got = overlong_penalty(lengths, max_response_len=16, cache_len=4, factor=1.0)
    # expected = 12: 10 -> 0, 12 -> 0, 14 -> (12-14)/4 = -0.5, 16 -> -1.0, 17 (> max) -> -1
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    with pytest.raises(ValueError, match=r"overlong_penalty\.cache_len"):
        overlong_penalty(lengths, max_response_len=16, cache_len=0)


def test_mask_truncated_zeroes_rows():
    mask = torch.ones(3, 4)
    got = mask_truncated(mask, torch.tensor([False, True, False]))
    assert got.sum(1).tolist() == [4.0, 0.0, 4.0]
    flags = mask_truncated(torch.ones(2, 3, dtype=torch.bool), torch.tensor([True, False]))  # bool masks stay bool
    assert flags.dtype == torch.bool and flags.tolist() == [[False] * 3, [True] * 3]


def test_ema_update_formula_period_and_frozen():
    momentum = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor([3])}
    policy = {"w": torch.tensor([3.0, 6.0]), "steps": torch.tensor([5])}
    assert not ema_update(momentum, policy, step=1, alpha=0.75, period=2)  # not a multiple of the period
    assert momentum["w"].tolist() == [1.0, 2.0]
    assert ema_update(momentum, policy, step=2, alpha=0.75, period=2)
    assert momentum["w"].tolist() == pytest.approx([0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 6])
    assert momentum["steps"].tolist() == [5]
    frozen = [torch.tensor([1.0])]
    assert not ema_update(frozen, [torch.tensor([9.0])], step=4, alpha=1.0, period=1)
    assert frozen[0].item() == 1.0
    with pytest.raises(ValueError, match=r"algorithm\.momentum\.alpha"):
        ema_update(frozen, frozen, step=1, alpha=1.5)


def test_ema_update_on_module_parameters():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = [0.5 * pa.detach() + 0.5 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters())]
    ema_update(a.parameters(), b.parameters(), step=1, alpha=0.5)
    for got, exp in zip(a.parameters(), expected):
        torch.testing.assert_close(got.detach(), exp)
