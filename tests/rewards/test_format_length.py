"""Format reward and the Kimi / cosine length baselines against hand-computed values."""

import math

import pytest
import torch

from rewards.format import format_reward
from rewards.length import cosine_length_reward, kimi_length_reward


def test_format_reward_structure_and_tags():
    responses = [
        "<think>\nwork\n</think>\n\nThe answer is \\boxed{4}.",
        "The answer is \\boxed{4}.",  # no think block
        "<think>a</think><think>b</think> \\boxed{4}",  # two blocks
        "<think>work</think> 4",  # no boxed answer
        "<think> </think> \\boxed{4}",  # empty reasoning
    ]
    assert format_reward(None, responses, None, [{}] * 5).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    custom = format_reward(None, ["<r>x</r> y"], None, [{}], think_open="<r>", think_close="</r>", answer_pattern=None)
    assert custom.tolist() == [1.0]


def test_kimi_length_reward_reference():
    ids = [[0] * n for n in (10, 20, 30, 20)]
    correct = torch.tensor([1.0, 1.0, 0.0, 0.0])
    got = kimi_length_reward(None, ["x"] * 4, ids, [{}] * 4, group_size=4, components={"correctness": correct})
    # lambda = 0.5 - (len - 10) / 20 -> [0.5, 0.0, -0.5, 0.0]; wrong -> min(0, lambda)
    assert got.tolist() == pytest.approx([0.5, 0.0, -0.5, 0.0])
    same = kimi_length_reward(None, ["x"] * 2, [[0], [0]], [{}] * 2, group_size=2, components={"correctness": correct[:2]})
    assert same.tolist() == [0.0, 0.0]


def test_cosine_length_reward_reference():
    ids = [[0] * n for n in (0, 500, 1000, 500)]
    correct = torch.tensor([1.0, 1.0, 0.0, 0.0])
    got = cosine_length_reward(None, ["x"] * 4, ids, [{}] * 4, components={"correctness": correct}, max_len=1000)
    def ref(n, ok):
        c = math.cos(math.pi * n / 1000)
        lo, hi = (0.5, 1.0) if ok else (-0.5, -1.0)
        return lo + 0.5 * (hi - lo) * (1 + c)
    assert got.tolist() == pytest.approx([ref(0, 1), ref(500, 1), ref(1000, 0), ref(500, 0)], abs=1e-6)
    assert got[0].item() == pytest.approx(1.0) and got[2].item() == pytest.approx(-0.5)


def test_length_reward_needs_correctness():
    with pytest.raises(ValueError, match="correctness"):
        kimi_length_reward(None, ["x"], [[0]], [{}], group_size=1)
