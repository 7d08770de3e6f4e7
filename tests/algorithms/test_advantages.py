"""Advantage estimators against float64 references written here (statistics module / by hand)."""

import math
import statistics

import pytest
import torch

from algorithms.advantages import aapo_advantages, group_relative_advantages, rloo_advantages

REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 0.25, 0.0, 0.0]  # two groups of G = 4
G = 4


def ref_group_relative(rewards, g, scale, eps):
    out = []
    batch_std = statistics.stdev(rewards)
    for start in range(0, len(rewards), g):
        group = rewards[start : start + g]
        mean = sum(group) / g
        std = {"group": statistics.stdev(group), "batch": batch_std, "none": None}[scale]
        out += [(r - mean) / (std + eps) if std is not None else r - mean for r in group]
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_relative_matches_reference(scale):
    got = group_relative_advantages(torch.tensor(REWARDS, dtype=torch.float64), G, scale=scale, eps=1e-4)
    assert got.tolist() == pytest.approx(ref_group_relative(REWARDS, G, scale, 1e-4), abs=1e-12)


def test_hand_computed_small_case():
    # group [1, 0]: mean 0.5, unbiased std sqrt(0.5) -> +-0.5 / (0.70710678 + 1e-4)
    got = group_relative_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2)
    expected = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert got.tolist() == pytest.approx([expected, -expected], abs=1e-12)


def test_all_equal_rewards_give_zero_advantage():
    for fn in (lambda r: group_relative_advantages(r, 4), lambda r: rloo_advantages(r, 4)):
        assert torch.equal(fn(torch.full((8,), 0.7, dtype=torch.float64)), torch.zeros(8, dtype=torch.float64))


def test_rloo_reference():
    got = rloo_advantages(torch.tensor(REWARDS, dtype=torch.float64), G)
    expected = []
    for start in range(0, len(REWARDS), G):
        group = REWARDS[start : start + G]
        expected += [r - (sum(group) - r) / (G - 1) for r in group]
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_group_size_one_fails_clearly():
    with pytest.raises(ValueError, match=r"algorithm\.group_size.*>= 2"):
        group_relative_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match=r"group_size"):
        rloo_advantages(torch.ones(4), 1)


def test_incomplete_group_fails():
    with pytest.raises(ValueError, match="whole number of groups"):
        group_relative_advantages(torch.ones(6), 4)


def test_nan_reward_fails_clearly():
    rewards = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    with pytest.raises(ValueError, match=r"non-finite rewards at batch indices \[1\]"):
        group_relative_advantages(rewards, 2)


def test_aapo_all_equal_rewards_nonzero_only_when_momentum_differs():
    rewards = torch.ones(4, dtype=torch.float64)  # every response correct: GRPO advantage is 0
    same = aapo_advantages(rewards, 4, torch.ones(4, dtype=torch.float64))
    assert torch.equal(same, torch.zeros(4, dtype=torch.float64))
    momentum = torch.tensor([1.0, 0.0, 0.9, 2.0], dtype=torch.float64)
    got = aapo_advantages(rewards, 4, momentum, c_low=0.2, c_high=0.28)
    # delta = r - r_m = [0, 1, 0.1, -1] -> clipped to [0, 0.28, 0.1, -0.2]
    assert got.tolist() == pytest.approx([0.0, 0.28, 0.1, -0.2], abs=1e-12)


def test_aapo_adds_momentum_to_group_term():
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    momentum = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5, 0.0, 0.1, 0.0], dtype=torch.float64)
    got = aapo_advantages(rewards, G, momentum, scale="group", eps=1e-4, c_low=0.2, c_high=0.28)
    group = ref_group_relative(REWARDS, G, "group", 1e-4)
    expected = [a + min(max(r - m, -0.2), 0.28) for a, r, m in zip(group, REWARDS, momentum.tolist())]
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_aapo_needs_momentum_rewards():
    with pytest.raises(ValueError, match="momentum_rollout"):
        aapo_advantages(torch.ones(4), 4, None)
