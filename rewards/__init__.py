"""Reward functions with one signature and their weighted sum (see rewards.registry; configs/reward/ names them)."""

from rewards.registry import CombinedReward, build_reward

__all__ = ["CombinedReward", "build_reward"]
