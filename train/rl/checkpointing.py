"""RL checkpoints: the policy in Hugging Face format (train/run/checkpoint.py writes it atomically) plus what a
resume needs: the trainer ranks' DeepSpeed state and lr schedule, the sampling rounds (sampler position, the
prefetched round's rollouts: ``PENDING_FILE``), the reward functions' state (Bingo's schedule), AAPO's momentum
weights, the RNG and the step. Under ``model.lora`` the HF model is the merged one and the trainer also writes the
adapter in peft's format under ``adapter/``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from train.run import checkpoint

log = logging.getLogger(__name__)
PENDING_FILE = "pending_rollouts.pt"  # rollout.async_steps=1: the next step's rollouts, sampled before the save


class RLCheckpoints:
    def __init__(self, run_dir, hf_model, tokenizer, algorithm_name: str, keep_last: int, actors, rounds, weight_sync):
        self.run_dir, self.hf_model, self.tokenizer = Path(run_dir), hf_model, tokenizer
        self.algorithm_name, self.keep_last = algorithm_name, keep_last
        self.actors, self.rounds, self.weight_sync = actors, rounds, weight_sync

    def save(self, step: int, weights: dict) -> Path:
        self.hf_model.load_state_dict(weights, strict=False)
        rounds = self.rounds.state_dict()

        def write_extra(directory: Path) -> None:  # inside the atomic write
            self.actors.trainer.save_state(str(directory))
            self.weight_sync.save(directory)
            if rounds["pending"] is not None:
                torch.save(rounds["pending"], directory / PENDING_FILE)

        state = {"sampler": rounds["sampler"], "algorithm": self.algorithm_name, "reward": self.actors.rewards.state_dict()}
        return checkpoint.save(self.run_dir, step, self.hf_model, self.tokenizer, state, self.keep_last,
                               write_extra=write_extra)

    def resume(self, directory: Path) -> int:
        """Load the checkpoint in ``directory`` into every part; returns its step."""
        state = checkpoint.load_trainer_state(directory)
        self.actors.trainer.load_state(str(directory), state["step"])
        pending = torch.load(directory / PENDING_FILE, weights_only=False) if (directory / PENDING_FILE).exists() else None
        self.rounds.load_state_dict({"sampler": state["sampler"], "pending": pending})
        self.actors.rewards.load_state_dict(state.get("reward", {}))  # e.g. Bingo's dynamic length schedule
        checkpoint.set_rng_state(state["rng"])
        self.weight_sync.resume(directory, self.actors.trainer.full_state_dict(), state["step"])
        log.info("resumed from %s at step %d", directory, state["step"])
        return state["step"]
