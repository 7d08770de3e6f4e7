"""One policy update on 2 DeepSpeed ranks (ZeRO-1/2/3, gloo on CPU) equals a single-process update."""

from functools import partial

import pytest
import torch
from omegaconf import OmegaConf

from data_pipelines.packing import IGNORE_INDEX, collate
from tests.conftest import TEST_ARCH, arithmetic_documents, tiny_model_path
from train.models.model_zoo import resolve_model_path

ray = pytest.importorskip("ray")
TRAINER = {"lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.0, "max_grad_norm": 1.0}


def _policy_gradient(logprobs, entropy, batch, extra, normaliser):
    """sum_t -A_doc * log pi over loss tokens / normaliser: enough structure to make every rank's share differ."""
    mask = (batch.labels[:, 1:] != IGNORE_INDEX).float()
    advantage = extra["advantage"][batch.doc_ids[:, 1:].clamp(min=0)] * mask
    return -(advantage * logprobs).sum() / normaliser, {"tokens": mask.sum()}


def _batches(tokenizer):
    docs = arithmetic_documents(tokenizer, 8, seed=11)
    batches = [collate([[docs[2 * i], docs[2 * i + 1]]], tokenizer.pad_token_id) for i in range(4)]  # 4 micro-batches
    extras = [{"advantage": torch.tensor([1.0 - 0.5 * i, -0.3 + 0.2 * i])} for i in range(4)]
    normaliser = float(sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches))
    return batches, extras, normaliser


def _max_error(got: dict, want: dict) -> str:
    name = max(want, key=lambda n: (got[n] - want[n]).abs().max().item())
    return f"largest difference {(got[name] - want[name]).abs().max().item():.2e} in {name} (|max| {want[name].abs().max().item():.2e})"


def test_zero_stages_match_single_process(ray_session, model_cache, tiny_tokenizer):
    """ZeRO-1/2/3 on 2 ranks take the same step as one process.

    The property is "same gradient, same update", checked on each part by a bound that follows from its numerics:
    - Gradients: each rank sums its own tokens' contributions and the ranks' sums are then added, so the fp32
      result is the same sum in another order. Its error is a few ulps of the tensor's largest entries, hence
      a tolerance relative to each tensor's largest magnitude (1e-5, ~80 ulps) rather than elementwise.
    - The AdamW step checks the optimizer wiring (the sharded optimizer applies the step to every shard). Adam's
      first step is lr * g / (|g| + eps) per element: bounded by lr, and for gradients near zero it amplifies
      reduction-order noise by up to 1/eps, so an elementwise rtol cannot hold; the bound is 1% of lr, the
      largest possible step (measured: 1.4e-6 at lr 1e-2, i.e. 1.4e-4 of lr).
    """
    from train.models.model_zoo import load_model
    from train.workers.actors import TrainerGroup

    path = tiny_model_path(model_cache, seed=5)
    initial = {n: p.detach() for n, p in load_model(path).named_parameters()}
    batches, extras, normaliser = _batches(tiny_tokenizer)
    reference = None
    for world, stage in [(1, 0), (2, 1), (2, 2), (2, 3)]:
        group = TrainerGroup(world, path, "sdpa", {**TRAINER, "zero_stage": stage}, micro_batches_per_rank=4 // world)
        stats = group.train_step(batches, partial(_policy_gradient, normaliser=normaliser), extras, keep_gradients=True)
        grads, weights = group.gradients(), group.full_state_dict()
        group.shutdown()
        assert sum(s["tokens"] for s in stats) == normaliser
        steps = {n: weights[n] - initial[n] for n in weights}
        if reference is None:
            reference = grads, steps
            assert max(s.abs().max().item() for s in steps.values()) > 1e-3  # the step really moved the weights
            assert all(g.abs().max() > 0 for g in grads.values())
            continue
        ref_grads, ref_steps = reference
        assert grads.keys() == ref_grads.keys() and steps.keys() == ref_steps.keys()
        for name, want in ref_grads.items():
            bound = 1e-5 * want.abs().max().item()
            assert (grads[name] - want).abs().max().item() <= bound, f"ZeRO-{stage} gradient: {_max_error(grads, ref_grads)}"
        for name, want in ref_steps.items():
            bound = 1e-2 * TRAINER["lr"]
            assert (steps[name] - want).abs().max().item() <= bound, f"ZeRO-{stage} AdamW step: {_max_error(steps, ref_steps)}"


def test_weight_sync_makes_rollout_logits_equal_the_trainers(ray_session, model_cache, tiny_tokenizer):
    from train.workers.actors import TrainerGroup
    from train.workers.rollout_worker import RolloutWorker

    path = tiny_model_path(model_cache, seed=6)
    batches, extras, normaliser = _batches(tiny_tokenizer)
    group = TrainerGroup(2, path, "sdpa", {**TRAINER, "zero_stage": 3}, micro_batches_per_rank=2)
    worker = ray.remote(RolloutWorker).remote(path)
    first_doc = int((batches[0].doc_ids[0] == 0).sum())
    ids = batches[0].input_ids[:1, :first_doc]  # the first document of the packed row, alone
    before = ray.get(worker.logits.remote(ids))
    group.train_step(batches, partial(_policy_gradient, normaliser=normaliser), extras)
    weights = group.full_state_dict()  # gathered from ZeRO-3 shards
    assert ray.get(worker.load_weights.remote(weights, 1)) == 1
    after = ray.get(worker.logits.remote(ids))
    trainer_logprobs = group.logprobs([batches[0], batches[1]])[0]
    group.shutdown()
    assert not torch.allclose(before, after)
    expected = torch.log_softmax(after[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(trainer_logprobs[0, : ids.shape[1] - 1], expected, rtol=1e-5, atol=1e-5)
    rollouts = ray.get(worker.generate.remote(["<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"], 3, 8, 1.0, 1.0, 0))
    assert len(rollouts) == 3 and all(r.policy_version == 1 and 0 < len(r.response_ids) <= 8 for r in rollouts)


def test_killed_rollout_worker_is_replaced_and_every_prompt_answered_once(ray_session, model_cache):
    from train.workers.actors import RolloutPool

    cfg = OmegaConf.create({"path": None, "cache_dir": str(model_cache), "tiny": {"vocab_size": 384, "seed": 7, "arch": TEST_ARCH}})
    pool = RolloutPool(2, str(resolve_model_path(cfg)))
    prompts = [f"<|im_start|>user\nWhat is {i} + 1?<|im_end|>\n<|im_start|>assistant\n" for i in range(5)]
    ray.kill(pool.workers[1])  # dies before (or while) the step runs
    rollouts = pool.generate(prompts, group_size=2, seed=0, max_new_tokens=4)
    assert pool.restarts == 1
    assert [r.prompt_index for r in rollouts] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    pool.shutdown()
