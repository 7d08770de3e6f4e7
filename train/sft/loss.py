"""The SFT loss on the trainer ranks: token cross-entropy, normalised by the loss tokens of the whole optimizer step.

    L = -(1 / N) * sum_{micro-batches m, all ranks} sum_{t in loss tokens of m} log p(x_{t+1} | x_{<=t})

with N the loss tokens of every micro-batch of the step on every rank. Each micro-batch returns its own share
(its sum / N); the rank rescales it to undo DeepSpeed's averaging (train/workers/policy_trainer.py), so any split
of the step over ranks x accumulation micro-batches takes the update of one process on the whole batch.
"""

from __future__ import annotations

import torch

from data_pipelines.packing import IGNORE_INDEX, PackedBatch


def loss_tokens(batch: PackedBatch) -> int:
    """Tokens trained on in ``batch``: labels of positions 1..seq-1 (position 0 predicts nothing)."""
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


class TokenCrossEntropy:
    """``loss_fn`` of ``PolicyTrainer.train_step`` for one SFT step of ``step_loss_tokens`` loss tokens (N above)."""

    needs_entropy = False

    def __init__(self, step_loss_tokens: int):
        self.step_loss_tokens = max(int(step_loss_tokens), 1)

    def __call__(self, logprobs: torch.Tensor, entropy, batch: PackedBatch, extra: dict) -> tuple[torch.Tensor, dict]:
        trained = batch.labels[:, 1:] != IGNORE_INDEX  # [rows, seq-1], aligned with logprobs
        return -logprobs[trained].sum() / self.step_loss_tokens, {"loss_tokens": trained.sum()}
