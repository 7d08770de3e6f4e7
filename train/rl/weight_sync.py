"""Weight sync after an update: the rollout workers load the trainer's new weights; for AAPO the momentum model's
rollout workers follow the policy by EMA (``algorithm.momentum``, alpha < 1), its weights kept here and
checkpointed (``MOMENTUM_FILE``)."""

from __future__ import annotations

import torch

from train.models.model_zoo import load_model

MOMENTUM_FILE = "momentum_model.pt"  # AAPO's EMA momentum weights inside a checkpoint (when alpha < 1)


class WeightSync:
    def __init__(self, rollout_pool, momentum_pool, momentum_update, model_path: str):
        self.rollout_pool, self.momentum_pool, self.momentum_update = rollout_pool, momentum_pool, momentum_update
        self.model_path = model_path  # the momentum model starts as the initial policy
        self.momentum_state: dict | None = None

    def __call__(self, weights: dict, version: int) -> None:
        self.rollout_pool.sync(weights, version)
        if self.momentum_update is None or self.momentum_pool is None:
            return
        if self.momentum_state is None and self.momentum_update.keywords.get("alpha", 1.0) < 1.0:
            initial = load_model(self.model_path).state_dict()
            self.momentum_state = {k: v.clone() for k, v in initial.items() if k in weights}
        if self.momentum_state is not None and self.momentum_update(
                self.momentum_state, {k: weights[k] for k in self.momentum_state}, step=version):
            self.momentum_pool.sync(self.momentum_state, version)

    def save(self, directory) -> None:
        if self.momentum_state is not None:
            torch.save(self.momentum_state, directory / MOMENTUM_FILE)

    def resume(self, directory, weights: dict, version: int) -> None:
        """The rollout workers (and the momentum model's) get the weights of the checkpoint in ``directory``."""
        self.rollout_pool.sync(weights, version)
        if self.momentum_pool is not None and (directory / MOMENTUM_FILE).exists():
            self.momentum_state = torch.load(directory / MOMENTUM_FILE)
            self.momentum_pool.sync(self.momentum_state, version)
