"""trainer.max_tokens_per_micro_batch: the count of micro-batches follows the rollouts' tokens (a multiple of the
trainer ranks, balanced over them), and the update equals the fixed-count and the whole-batch update."""

import random
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from data_pipelines.packing import balanced_bins
from tests.conftest import TEST_ARCH
from train.rl.algorithm import Algorithm
from train.rl.logprobs import StepLogprobs, record_logprobs
from train.rl.step_metrics import PhaseTimer
from train.rl.update_batches import budget_micro_batches, largest_bin, pack_updates

GROUP = 4
PACKING = {"group_size": GROUP, "row_tokens": 256, "attn_backend": "sdpa", "mask_truncated": False}


def _rollouts(groups: int, shortest: int, longest: int, seed: int):
    """``groups`` prompts of 5-9 tokens, G responses each of ``shortest``..``longest`` random tokens, contiguous."""
    rng = random.Random(seed)
    rollouts = []
    for index in range(groups):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randint(5, 9))]
        for _ in range(GROUP):
            rollouts.append(SimpleNamespace(prompt_index=index, prompt_ids=prompt, truncated=False, meta={}, logprobs=None,
                                            response_ids=[rng.randrange(3, 300) for _ in range(rng.randint(shortest, longest))]))
    return rollouts


def _doc_tokens(rollouts, members):
    return sum(len(rollouts[i].prompt_ids) + len(rollouts[i].response_ids) for i in members)


def test_largest_bin_is_balanced_bins_heaviest():
    rng = random.Random(0)
    for _ in range(50):
        sizes = [rng.randint(1, 60) for _ in range(rng.randint(1, 30))]
        bins = rng.randint(1, 8)
        assert largest_bin(sizes, bins) == max(sum(sizes[i] for i in b) for b in balanced_bins(sizes, bins))


def test_budget_count_by_hand():
    # 10 + 9 + 8 + 7 + 6 = 40 tokens. Budget 16: ceil(40 / 16) = 3 bins, LPT loads 10, 9 + 6, 8 + 7 = 15: fits
    assert budget_micro_batches([10, 9, 8, 7, 6], 16, 1) == 3
    # budget 14: 3 bins hold 15 > 14; 4 bins: 10, 9, 8, 7 + 6 = 13: fits
    assert budget_micro_batches([10, 9, 8, 7, 6], 14, 1) == 4
    # budget 12: ceil(40 / 12) = 4 bins hold 13 > 12; 5 bins: one each
    assert budget_micro_batches([10, 9, 8, 7, 6], 12, 1) == 5
    # on 2 ranks a multiple of 2: budget 16 needs 3 -> 4
    assert budget_micro_batches([10, 9, 8, 7, 6], 16, 2) == 4
    # never more than the items fill: 3 items on 2 ranks -> 2, even if a micro-batch exceeds the budget
    assert budget_micro_batches([10, 10, 10], 10, 2) == 2
    assert budget_micro_batches([5], 100, 1) == 1


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("world", [1, 2])
def test_count_grows_with_the_lengths_and_every_micro_batch_fits(share_prompt, world):
    budget = 256
    counts = []
    for shortest, longest in [(4, 12), (20, 60), (60, 160)]:
        rollouts = _rollouts(8, shortest, longest, seed=shortest)
        updates = pack_updates(rollouts, world, 2, share_prompt=share_prompt, pad_token_id=0, max_tokens=budget, **PACKING)
        assert len(updates) == 2
        for u in updates:
            assert len(u.micro) % world == 0
            shared = [hasattr(b, "prompt_lengths") for b in u.micro]
            # a shared prompt is computed once for its group; a group longer than the budget is packed as documents
            assert all(shared) == (share_prompt and shortest < 60) and len(set(shared)) == 1
            loads = [int(b.prompt_lengths.sum() + b.response_lengths.sum()) if shared[0] else _doc_tokens(rollouts, m)
                     for b, m in zip(u.micro, u.members)]
            assert max(loads) <= budget, loads
            assert sorted(i for m in u.members for i in m) == sorted({i for m in u.members for i in m})
            per_rank = [sum(loads[r * len(loads) // world:(r + 1) * len(loads) // world]) for r in range(world)]
            assert max(per_rank) - min(per_rank) <= max(loads)  # balanced over the ranks within one micro-batch
        counts.append(sum(len(u.micro) for u in updates))
    assert counts[0] < counts[1] < counts[2], counts


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_normaliser_does_not_depend_on_the_count(compose, mode):
    algorithm = Algorithm.from_config(compose(["experiment=quickstart_rl", f"algorithm.group_size={GROUP}",
                                               f"algorithm.loss.aggregation.mode={mode}"]).algorithm)
    rollouts = _rollouts(4, 6, 60, seed=3)
    whole = pack_updates(rollouts, 1, 1, share_prompt=False, pad_token_id=0, **PACKING)[0]
    budget = pack_updates(rollouts, 1, 1, share_prompt=False, pad_token_id=0, max_tokens=120, **PACKING)[0]
    assert len(whole.micro) == 1 and len(budget.micro) >= 4
    assert algorithm.loss(budget).normalizer == algorithm.loss(whole).normalizer
    want = sum(len(r.response_ids) for r in rollouts) if mode == "token-mean" else len(rollouts)
    assert algorithm.loss(whole).normalizer == want


# -- the update on DeepSpeed ranks -------------------------------------------------------------------------------

ray = pytest.importorskip("ray")
LR = 1e-4
TRAINER = {"lr": LR, "betas": [0.9, 0.95], "weight_decay": 0.0, "max_grad_norm": 0.0, "zero_stage": 0}


@pytest.mark.slow  # five DeepSpeed worlds, two steps each: ~2-3 min on 2 busy cores
def test_budget_update_equals_fixed_count_and_whole_batch(ray_session, compose, model_cache):
    """Two RL steps (the second's rollouts ~2x longer) with a token budget on 1 rank and on 2 gloo ranks (ZeRO-0 and
    ZeRO-3; a different count each step), with a fixed count of 4 and with one whole-batch micro-batch: the reduced gradients, the
    weights after each step and the pi_old log-probs (recorded through the same micro-batches) agree.

    Tolerances (fp32): the gradient is the same sum in another order, so each tensor agrees within 1e-5 of its
    largest entry (~80 ulps). The gradient is what the normalisation decides (AdamW's step is nearly blind to a
    gradient's scale). The weights check the optimizer wiring: AdamW moves a weight by at most ~lr per step, and for
    gradients near zero it amplifies reorder noise by up to 1/eps, so the bound is 1% of lr = 1e-6 (as in
    tests/train/workers/test_policy_trainer_zero.py; measured 1.5e-6 at lr 1e-3 on the fixed count, i.e. 1.5e-3 lr)."""
    from train.models.model_zoo import load_model, resolve_model_path
    from train.rl.policy_update import update_policy
    from train.workers.actors import TrainerGroup

    cfg = compose(["experiment=quickstart_rl", f"algorithm.group_size={GROUP}", "algorithm.loss.aggregation.mode=token-mean"])
    algorithm = Algorithm.from_config(cfg.algorithm)
    model_cfg = OmegaConf.create({"path": None, "cache_dir": str(model_cache), "tiny": {"vocab_size": 384, "seed": 8, "arch": TEST_ARCH}})
    path = str(resolve_model_path(model_cfg))
    initial = {n: p.detach() for n, p in load_model(path).named_parameters()}
    steps = [_rollouts(4, 6, 40, seed=1), _rollouts(4, 30, 90, seed=2)]  # 16 rollouts each, the second ~2x longer
    advantages = [torch.tensor([(-1.0) ** i * (0.3 + 0.1 * (i % 5)) for i in range(16)]) for _ in steps]
    runs = {  # name: (world_size, micro_batches_per_rank, max_tokens, ZeRO stage)
        "whole": (1, 1, None, 0), "fixed_1rank": (1, 4, None, 0), "budget_1rank": (1, 1, 200, 0),
        "budget_2ranks": (2, 1, 200, 0), "budget_2ranks_zero3": (2, 1, 200, 3),
    }
    results = {}
    for name, (world, per_rank, budget, stage) in runs.items():
        group = TrainerGroup(world, path, "sdpa", {**TRAINER, "zero_stage": stage}, micro_batches_per_rank=per_rank)
        counts, grads, weights, old = [], [], [], []
        for rollouts, adv in zip(steps, advantages):
            updates = pack_updates(rollouts, world * per_rank, 1, share_prompt=False, pad_token_id=0, max_tokens=budget,
                                   **PACKING)
            counts.append(len(updates[0].micro))
            # pi_old through the same micro-batches (the log-prob forwards), put back in rollout order
            recorded = record_logprobs(group, None, updates, True, PhaseTimer())
            old.append(_by_rollout(updates[0], recorded.old[0], recorded.masks[0]))
            logprobs = StepLogprobs([[None] * len(u.micro) for u in updates], None, [[None] * len(u.micro) for u in updates])
            update_policy(_KeepGradients(group), algorithm, updates, adv, logprobs, 1, rollouts)
            grads.append(group.gradients())
            weights.append(group.full_state_dict())
        group.shutdown()
        results[name] = counts, grads, weights, old

    assert results["whole"][0] == [1, 1] and results["fixed_1rank"][0] == [4, 4]
    one, two = results["budget_1rank"][0], results["budget_2ranks"][0]
    assert 2 <= one[0] < one[1] and 2 <= two[0] < two[1] and all(c % 2 == 0 for c in two), (one, two)
    assert results["budget_2ranks_zero3"][0] == two
    _, ref_grads, ref_weights, ref_old = results["whole"]
    for step, (rg, rw) in enumerate(zip(ref_grads, ref_weights)):
        moved = max((rw[n] - (initial[n] if step == 0 else ref_weights[step - 1][n])).abs().max().item() for n in rw)
        assert moved > 0.5 * LR  # the step really moved the weights
    for name, (counts, grads, weights, old) in results.items():
        for step in range(2):
            for n, want in ref_grads[step].items():
                error = (grads[step][n] - want).abs().max().item()
                assert error <= 1e-5 * want.abs().max().item(), f"{name} step {step + 1} gradient of {n}: {error:.2e}"
            for n, want in ref_weights[step].items():
                error = (weights[step][n] - want).abs().max().item()
                assert error <= 1e-2 * LR, f"{name} step {step + 1} weight {n}: {error:.2e}"
            for i, want in enumerate(ref_old[step]):
                torch.testing.assert_close(old[step][i], want, rtol=1e-5, atol=1e-6)


class _KeepGradients:
    """The trainer group, asked to keep the step's reduced gradient (``update_policy`` does not)."""

    def __init__(self, group):
        self.group = group

    def train_step(self, batches, loss_fn, extras):
        return self.group.train_step(batches, loss_fn, extras, keep_gradients=True)


def _by_rollout(update, old, masks) -> list[torch.Tensor]:
    """Per-rollout response log-probs from per-micro-batch [docs, width] tensors, in rollout order."""
    out = {}
    for members, lp, mask in zip(update.members, old, masks):
        for row, i in enumerate(members):
            out[i] = lp[row][mask[row]]
    return [out[i] for i in sorted(out)]


# -- from the command line ---------------------------------------------------------------------------------------

def test_budget_below_a_row_fails_before_any_work(compose, tmp_path):
    from tests.train.rl.test_rl import FAST_RL
    from train.__main__ import run
    from train.run.config_checks import ConfigError

    cfg = compose(FAST_RL + ["trainer.max_tokens_per_micro_batch=100", f"run_dir={tmp_path}/bad"])
    with pytest.raises(ConfigError, match=r"trainer\.max_tokens_per_micro_batch=100 must be an integer >= trainer\.row_tokens=2048"):
        run(cfg)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # one RL step of the driver
def test_rl_run_logs_the_budgeted_micro_batch_count(compose, tmp_path):
    """``python -m train ... trainer.max_tokens_per_micro_batch=128``: 8 rollouts of ~50 tokens need >= 4
    micro-batches of 128 tokens; the step's count is logged."""
    from tests.train.rl.test_rl import FAST_RL, VARIED_REWARD
    from train.__main__ import run

    try:
        out = run(compose(FAST_RL + VARIED_REWARD + ["trainer.max_steps=1", "trainer.save_every=0", "trainer.share_prompt=false",
                                     "trainer.row_tokens=128", "trainer.max_tokens_per_micro_batch=128",
                                     f"run_dir={tmp_path}/budget"]))
    finally:
        ray.shutdown()
    (metrics,) = out["history"]
    assert metrics["train/micro_batches"] >= 4 and metrics["train/optimizer_steps"] == 1
    assert metrics["train/grad_norm"] > 0  # the varied reward gives non-zero advantages: the update really ran
