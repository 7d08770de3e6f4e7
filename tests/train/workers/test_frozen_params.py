"""Curriculum freezing on ZeRO 1-3 (train/workers/frozen_params.py): a parameter frozen after the engine exists keeps
its weights through later steps, as on ZeRO-0 where AdamW skips it, while the rest trains as on ZeRO-0."""

import re

import pytest
import torch

from data_pipelines.packing import collate
from tests.conftest import arithmetic_documents, tiny_model_path
from train.sft.curriculum import Freeze
from train.sft.loss import TokenCrossEntropy, loss_tokens

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("one_thread")
# weight decay on: under ZeRO without the hooks it alone would move a frozen parameter
TRAINER = {"lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.1, "max_grad_norm": 1.0, "warmup_steps": 0}
FROZEN = r"layers\.0\."


def _batches(tokenizer) -> list:
    docs = arithmetic_documents(tokenizer, 6, seed=11)
    return [collate([docs[0:1]], tokenizer.pad_token_id), collate([docs[1:3]], tokenizer.pad_token_id),
            collate([docs[3:5]], tokenizer.pad_token_id), collate([docs[5:6]], tokenizer.pad_token_id)]


def _run(path, batches, world: int, stage: int) -> tuple[dict, dict]:
    """One step with everything trainable (so Adam has moments), then two with ``FROZEN`` frozen. Returns the weights
    after the first step and after the last."""
    from train.workers.actors import TrainerGroup

    tokens = sum(loss_tokens(b) for b in batches)
    group = TrainerGroup(world, path, "sdpa", {**TRAINER, "zero_stage": stage}, micro_batches_per_rank=4 // world)
    try:
        group.train_step(batches, TokenCrossEntropy(tokens), [{}] * 4)
        first = group.full_state_dict()
        frozen = group.apply_to_model(Freeze(1, (FROZEN,)))
        assert frozen == sum(bool(re.search(FROZEN, n)) for n in first)  # every tensor of layer 0
        for _ in range(2):
            group.train_step(batches, TokenCrossEntropy(tokens), [{}] * 4)
        return first, group.full_state_dict()
    finally:
        group.shutdown()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_frozen_parameters_stay_put_under_zero_and_the_rest_trains_as_zero_0(ray_session, model_cache, tiny_tokenizer, stage):
    """Frozen tensors: bit-identical to their values when frozen. The others: within 1% of lr of the ZeRO-0
    run's weights (the bound of test_sft_ranks.py: reduction order differs between stages)."""
    path = tiny_model_path(model_cache, seed=7)
    batches = _batches(tiny_tokenizer)
    want_first, want_last = _run(path, batches, 1, 0)
    first, last = _run(path, batches, 2, stage)
    frozen = [n for n in last if re.search(FROZEN, n)]
    assert frozen
    for name in last:
        if name in frozen:
            assert torch.equal(last[name], first[name]), f"ZeRO-{stage}: frozen {name} moved"
        else:
            assert not torch.equal(last[name], first[name]), f"ZeRO-{stage}: {name} did not train"
        error = (last[name] - want_last[name]).abs().max().item()
        assert error <= 1e-2 * TRAINER["lr"], f"ZeRO-{stage}: {name} off the ZeRO-0 run by {error:.2e}"
