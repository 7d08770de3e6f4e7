"""Reward functions with one signature, a registry and a weighted sum (see rewards.registry)."""

from rewards.registry import REWARDS, CombinedReward, build_reward

__all__ = ["REWARDS", "CombinedReward", "build_reward"]
