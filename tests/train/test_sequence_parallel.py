"""Ulysses sequence parallelism (train/models/sequence_parallel.py): an SFT step and an RL update on 2 gloo ranks
with trainer.sequence_parallel_size=2 (one SP group: both ranks hold half of every row) equal the step of one
process with SP 1, on packed rows of several documents of different lengths and on a single-pass multi-turn
document; plus the config checks.

Tolerances (fp32), as in tests/train/workers/test_policy_trainer_zero.py:
- gradients: the SP ranks' gradients are added (all-reduce), and attention / the output projection sum over the
  heads in another grouping, so the fp32 result is the same sum in another order: a few ulps of each tensor's
  largest entries, checked at 1e-5 of each tensor's largest magnitude (measured: ~2e-7).
- weights after the AdamW step: Adam's first step lr * g / (|g| + eps) amplifies reduction-order noise of
  near-zero gradients by up to 1/eps, so the bound is 1% of lr (the largest possible step is lr).
The SP 2 gradient of either rank alone is checked to be far from the SP 1 gradient, so the equality is the sum of
the two halves and not one rank redoing the whole row.
"""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf

from data_pipelines.arithmetic import ArithmeticSpec, generate
from data_pipelines.chat_format import chat_ids
from data_pipelines.multiturn import document_from_messages
from data_pipelines.packing import IGNORE_INDEX, Document, collate
from tests.conftest import TEST_ARCH, tiny_model_path
from train.models.document_attention import PER_DOCUMENT_SDPA
from train.models.sequence_parallel import ATTENTION_KEY
from train.run.config_checks import (
    ConfigError,
    check_sequence_parallel_model,
    check_sequence_parallel_size,
)

ray = pytest.importorskip("ray")
TRAINER = {"lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.0, "max_grad_norm": 1.0, "zero_stage": 0}


@pytest.fixture(scope="module")
def model_path(model_cache):
    return tiny_model_path(model_cache, seed=9)


def _documents(tokenizer):
    """Packed rows: row 0 holds three chats of different lengths, row 1 a single-pass multi-turn chat (several
    segments with per-turn visibility, data_pipelines/multiturn.py) and one more chat; the second micro-batch has
    an odd total length (a row padded for the split) and one row."""
    chats = generate(ArithmeticSpec(verbosity=0.5), 6, seed=3)
    docs = [Document(*chat_ids(tokenizer, c["messages"]), sample_id=c["id"]) for c in chats]
    multi = generate(ArithmeticSpec(verbosity=0.3, turns=3), 1, seed=4)[0]
    multi_doc = document_from_messages(tokenizer, multi["messages"], sample_id=multi["id"])
    assert multi_doc.num_segments > 1
    first = collate([[docs[0], docs[1], docs[2]], [multi_doc, docs[3]]], tokenizer.pad_token_id)
    cut = 1 if (len(docs[4]) + len(docs[5])) % 2 == 0 else 2  # an odd row length: padded by one for the split
    second = collate([[docs[4], Document(docs[5].input_ids[:-cut], docs[5].loss_mask[:-cut], sample_id="cut")]],
                     tokenizer.pad_token_id)
    assert not first.plain and second.input_ids.shape[1] % 2 == 1
    return [first, second]


def _attention_key(trainer):
    return trainer.engine.module.config._attn_implementation


def _step(path, world, sp, batches, loss_fn, extras, zero_stage=0):
    """(log-probs before the step, stats, reduced gradient, weights after the step) of one step on ``world`` ranks."""
    from train.workers.actors import TrainerGroup

    group = TrainerGroup(world, path, "sdpa", {**TRAINER, "sequence_parallel_size": sp, "zero_stage": zero_stage},
                         micro_batches_per_rank=len(batches) * sp // world)
    try:
        keys = group._get([r.__ray_call__.remote(_attention_key) for r in group.ranks], "attention")
        assert keys == ([ATTENTION_KEY] * world if sp > 1 else [PER_DOCUMENT_SDPA] * world)
        logprobs = group.logprobs(batches)
        stats = group.train_step(batches, loss_fn, extras, keep_gradients=True)
        grads, weights = group.gradients(), group.full_state_dict()
    finally:
        group.shutdown()
    return logprobs, stats, grads, weights


def _check_equal(ref, got, initial):
    """SP 2 == SP 1: log-probs, loss, reduced gradient (1e-5 of each tensor's largest entry), AdamW step (1% of lr).
    Were the rows not split (each rank running the whole row), the reduced gradient would be twice SP 1's."""
    ref_lp, ref_stats, ref_grads, ref_weights = ref
    lp, stats, grads, weights = got
    assert len(lp) == len(ref_lp) and len(stats) == len(ref_stats) == 1  # one data-parallel group: one share
    for a, b in zip(ref_lp, lp):
        assert b.shape == a.shape
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert stats[0]["loss_sum"] == pytest.approx(ref_stats[0]["loss_sum"], rel=1e-5)
    assert all(g.abs().max() > 0 for g in ref_grads.values())
    for name, want in ref_grads.items():
        bound = 1e-5 * want.abs().max().item()
        assert (grads[name] - want).abs().max().item() <= bound, f"gradient of {name}"
    assert max((ref_weights[n] - initial[n]).abs().max().item() for n in ref_weights) > 1e-3  # the step moved them
    for name, want in ref_weights.items():
        assert (weights[name] - want).abs().max().item() <= 1e-2 * TRAINER["lr"], f"weights of {name}"


def _initial(path):
    from train.models.model_zoo import load_model

    return {n: p.detach() for n, p in load_model(path).named_parameters()}


def test_sft_step_with_sp2_equals_sp1(ray_session, model_path, tiny_tokenizer):
    from train.sft.loss import TokenCrossEntropy, loss_tokens

    batches = _documents(tiny_tokenizer)
    loss = TokenCrossEntropy(sum(loss_tokens(b) for b in batches))
    extras = [{} for _ in batches]
    ref = _step(model_path, 1, 1, batches, loss, extras)
    got = _step(model_path, 2, 2, batches, loss, extras)
    _check_equal(ref, got, _initial(model_path))


def test_rl_update_with_sp2_equals_sp1(ray_session, model_path, tiny_tokenizer, compose):
    """GRPO's clipped objective (algorithms/, as configs/algorithm/grpo.yaml builds it) with an entropy bonus, through
    the RL loss on packed rows (train/rl/algorithm.py PackedLoss): per-document log-probs, a recorded pi_old away
    from pi (some ratios clipped), token-mean over the step's response tokens. The SP 2 ranks run ZeRO-3 (parameters,
    gradients and optimizer state partitioned over the world, i.e. over the SP group's two ranks)."""
    from hydra.utils import instantiate

    from train.models.forward import per_document
    from train.rl.algorithm import PackedLoss

    cfg = compose(["algorithm=grpo", "trainer=rl", "algorithm.loss.entropy_coef=0.01",
                   "algorithm.loss.aggregation.mode=token-mean"])
    objective = instantiate(cfg.algorithm.loss)
    batches = _documents(tiny_tokenizer)
    generator = torch.Generator().manual_seed(0)
    extras = []
    for batch in batches:
        docs = len(batch.sample_ids)
        _, mask = per_document(torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1] - 1), batch)
        old = -2.0 - 0.5 * torch.rand(mask.shape, generator=generator)
        extras.append({"advantages": torch.linspace(-1.0, 1.5, docs), "old_logprobs": old, "ref_logprobs": None})
    tokens = float(sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in batches))
    loss = PackedLoss(objective, tokens, entropy_bonus=True)
    ref = _step(model_path, 1, 1, batches, loss, extras)
    got = _step(model_path, 2, 2, batches, loss, extras, zero_stage=3)  # ZeRO-3 shards over both SP ranks
    _check_equal(ref, got, _initial(model_path))
    assert got[1][0]["tokens"] == ref[1][0]["tokens"] == tokens


# -- config checks ------------------------------------------------------------------------------------------------
def _trainer(**keys):
    return OmegaConf.create({"world_size": 2, "sequence_parallel_size": 2, "share_prompt": "auto", **keys})


def test_sequence_parallel_config_checks_name_the_keys():
    check_sequence_parallel_size(_trainer(), "sdpa")
    check_sequence_parallel_size(_trainer(world_size=3, sequence_parallel_size=1), "flash")  # SP 1: nothing to check
    for trainer, backend, key in [
        (_trainer(world_size=3), "sdpa", "trainer.world_size=3 must be a multiple of trainer.sequence_parallel_size=2"),
        (_trainer(sequence_parallel_size=0), "sdpa", "trainer.sequence_parallel_size=0 must be an integer >= 1"),
        (_trainer(), "flex", "model.attn_backend=sdpa only"),
        (_trainer(), "flash", "model.attn_backend=flash"),
        (_trainer(share_prompt=True), "sdpa", "trainer.share_prompt=true"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            check_sequence_parallel_size(trainer, backend)


def test_sequence_parallel_model_checks_heads_and_ssm():
    from transformers import AutoConfig

    arch = {k: v for k, v in TEST_ARCH.items() if k != "model_type"}  # 4 heads, 2 key/value heads
    qwen = AutoConfig.for_model("qwen2", **arch)
    check_sequence_parallel_model(qwen, 2)
    check_sequence_parallel_model(qwen, 4)  # 1 head per rank, each of the 2 kv heads replicated twice (DeepSpeed)
    with pytest.raises(ConfigError, match="must divide the model's 4 attention heads"):
        check_sequence_parallel_model(qwen, 3)
    with pytest.raises(ConfigError, match="2 key/value heads"):
        check_sequence_parallel_model(AutoConfig.for_model("qwen2", **{**arch, "num_attention_heads": 6}), 3)
    mamba = AutoConfig.for_model("mamba2", hidden_size=32, num_heads=4, head_dim=16, n_groups=1, num_hidden_layers=1)
    with pytest.raises(ConfigError, match="attention-free"):
        check_sequence_parallel_model(mamba, 2)


def test_trainer_group_hands_each_sp_group_one_share():
    """world 4, SP 2: ranks 0 and 1 (one SP group) get the first half of the micro-batches, ranks 2 and 3 the second;
    the group's results are read from ranks 0 and 2 only (their SP partners return the same whole-row numbers)."""
    from train.workers.actors import TrainerGroup

    group = TrainerGroup.__new__(TrainerGroup)  # the hand-out only: no actors
    group.world_size, group.sp, group.data_parallel = 4, 2, 2
    assert group.shard(list("abcd")) == [["a", "b"], ["a", "b"], ["c", "d"], ["c", "d"]]
    assert group._one_per_group(["r0", "r1", "r2", "r3"]) == ["r0", "r2"]
    with pytest.raises(ValueError, match="do not split evenly over 2 data-parallel"):
        group.shard(list("abc"))
