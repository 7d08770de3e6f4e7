"""One reward signature, and the weighted sum the RL recipe calls (components named by Hydra `_target_`s in
configs/reward/, the registry of built-in rewards).

Every reward function (or callable object) has the signature::

    fn(prompts: list[str], responses: list[str], response_ids: list[list[int]], metadata: list[dict],
       *, step: int, group_size: int, components: dict[str, Tensor]) -> Tensor[batch] | (Tensor[batch], dict)

``metadata[i]`` holds at least "answer"; unknown keys must be ignored. ``components`` holds the
components already computed for this batch (in config order), so e.g. Bingo can reuse correctness.
The optional dict holds per-sample diagnostics ([batch] tensors or lists) for logging.

From the config (``cfg.reward`` is a node of named components, each with ``_target_`` and ``weight``)::

    reward_fn = build_reward(cfg.reward)
    total, components, diagnostics = reward_fn(prompts, responses, response_ids, metadata, step=step,
                                               group_size=cfg.algorithm.group_size)
    # total [batch] = sum_k weight_k * components[k]; log components[k].mean() as reward/<k>
"""

from __future__ import annotations

from typing import Callable

import torch


class RewardConfigError(ValueError):
    """A ``reward`` config the rewards cannot be built from (``python -m train`` prints it as one line)."""


class CombinedReward:
    """total_i = sum_k w_k * r_k(i); every component checked for shape and finiteness, by name."""

    def __init__(self, components: dict[str, Callable], weights: dict[str, float]):
        if not components:
            raise RewardConfigError("reward: no reward component selected; use e.g. reward=[correctness,format]")
        self.components = components
        self.weights = weights

    def __call__(self, prompts, responses, response_ids, metadata, *, step: int = 0, group_size: int = 1):
        batch = len(responses)
        if not (len(metadata) == batch and (prompts is None or len(prompts) == batch)):
            raise ValueError(f"reward: {batch} responses but {len(metadata)} metadata rows / prompts")
        total = torch.zeros(batch, dtype=torch.float32)
        scores: dict[str, torch.Tensor] = {}
        diagnostics: dict[str, object] = {}
        for name, fn in self.components.items():
            out = fn(prompts, responses, response_ids, metadata, step=step, group_size=group_size, components=scores)
            values, extra = out if isinstance(out, tuple) else (out, {})
            values = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
            if values.shape[0] != batch:
                raise ValueError(f"reward.{name} returned {values.shape[0]} values for a batch of {batch}")
            if not torch.isfinite(values).all():
                bad = (~torch.isfinite(values)).nonzero().flatten().tolist()[:8]
                raise ValueError(
                    f"reward.{name} returned non-finite values at batch indices {bad}: fix the reward function "
                    f"({type(fn).__name__ if not hasattr(fn, '__name__') else fn.__name__}) or its inputs"
                )
            scores[name] = values
            total = total + self.weights[name] * values
            for key, value in (extra or {}).items():
                diagnostics[f"{name}/{key}"] = value
        return total, scores, diagnostics

    def state_dict(self) -> dict:
        """State kept across steps by components that have any (Bingo's dynamic schedule), by component name."""
        states = {name: fn.state_dict() for name, fn in self.components.items() if hasattr(fn, "state_dict")}
        return {name: state for name, state in states.items() if state}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            if name not in self.components:
                raise KeyError(f"reward state names component {name!r}, but the run's rewards are {sorted(self.components)}")
            self.components[name].load_state_dict(value)

    def close(self) -> None:
        for fn in self.components.values():
            if hasattr(fn, "close"):
                fn.close()


def build_reward(reward_cfg) -> CombinedReward:
    """Instantiate every component of ``cfg.reward`` (a mapping name -> {_target_, weight, ...})."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(reward_cfg, resolve=True) if not isinstance(reward_cfg, dict) else dict(reward_cfg)
    components, weights = {}, {}
    for name, node in cfg.items():
        if not isinstance(node, dict) or "_target_" not in node:
            raise RewardConfigError(f"reward.{name} must be a node with `_target_` and `weight` (see configs/reward/)")
        node = dict(node)
        weight = node.pop("weight", 1.0)
        if weight is None or not isinstance(weight, (int, float)):
            raise RewardConfigError(f"reward.{name}.weight must be a number, got {weight!r}")
        components[name] = instantiate(node)
        weights[name] = float(weight)
    return CombinedReward(components, weights)

