"""A non-finite loss or gradient on one rank: every rank skips the optimizer step (weights, AdamW state, policy version
and lr schedule as they were), the next good step trains as the first one would, and the recipes stop after
``trainer.max_bad_steps`` skipped steps in a row with the last good checkpoint and the resume command
(train/workers/policy_trainer.py ``train_step``, train/workers/run_stops.py)."""

import math
from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import TEST_ARCH
from tests.train.workers.test_policy_trainer_zero import _batches, _policy_gradient
from train.models.model_zoo import resolve_model_path

ray = pytest.importorskip("ray")
TRAINER = {"lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.1, "max_grad_norm": 1.0, "warmup_steps": 0, "max_steps": 4,
           "min_lr_ratio": 0.5}
FAULTY = str(Path(__file__).resolve().parent)


@pytest.fixture(scope="module")
def ray_session():
    from train.workers.ray_session import init_ray

    init_ray(num_cpus=4)
    yield
    ray.shutdown()


def _on_rank(bad_rank: int, kind: str, logprobs, entropy, batch, extra, normaliser):
    """The policy-gradient loss, broken on ``bad_rank``: ``nan_loss`` makes the loss NaN; ``nan_grad`` keeps the loss
    finite (+0) but makes its gradient NaN (d sqrt(x)/dx at 0 is inf, times the 0 of d(0 * s)/ds)."""
    loss, stats = _policy_gradient(logprobs, entropy, batch, extra, normaliser)
    if torch.distributed.get_rank() == bad_rank:
        loss = loss * float("nan") if kind == "nan_loss" else loss + torch.sqrt(logprobs.sum() * 0.0)
    return loss, stats


def _version(trainer) -> int:
    return trainer.version


def _adam_steps(trainer) -> list[float]:
    return sorted(float(s["step"]) for s in trainer.engine.basic_optimizer.state.values())


@pytest.mark.parametrize("stage", [0, 2])
def test_a_nonfinite_step_on_one_rank_is_skipped_on_all_and_the_next_step_trains(ray_session, model_cache,
                                                                                tiny_tokenizer, stage):
    """ZeRO-0 (our check of the loss flag and the gradient norm) and ZeRO-2 (our loss flag; DeepSpeed's own skip of a
    non-finite gradient norm): two bad steps, then the first good step is bitwise the first step of a world that
    never saw them (no stale gradient, no AdamW step: with weight decay 0.1 even a zero-gradient step would move
    the weights, and a counted AdamW step would change the next update by ~25% of lr through the bias correction)."""
    from train.workers.actors import TrainerGroup

    cfg = OmegaConf.create({"path": None, "cache_dir": str(model_cache), "tiny": {"vocab_size": 384, "seed": 5, "arch": TEST_ARCH}})
    path = str(resolve_model_path(cfg))
    batches, extras, normaliser = _batches(tiny_tokenizer)
    good = partial(_policy_gradient, normaliser=normaliser)

    fresh = TrainerGroup(2, path, "sdpa", {**TRAINER, "zero_stage": stage}, micro_batches_per_rank=2)
    initial = fresh.full_state_dict()
    fresh.train_step(batches, good, extras)
    want = fresh.full_state_dict()  # one good step from the start
    fresh.shutdown()
    assert max((want[n] - initial[n]).abs().max().item() for n in want) > 1e-3  # that step moves the weights

    group = TrainerGroup(2, path, "sdpa", {**TRAINER, "zero_stage": stage}, micro_batches_per_rank=2)
    lrs = []
    for bad_rank, kind in ((1, "nan_loss"), (0, "nan_grad")):  # two bad steps in a row, on one rank each
        stats = group.train_step(batches, partial(_on_rank, bad_rank, kind, normaliser=normaliser), extras)
        lrs.append(group.advance_lr_schedule())
        assert [s["skipped"] for s in stats] == [1.0, 1.0], kind
        if kind == "nan_loss":
            assert math.isnan(stats[bad_rank]["loss_sum"]) and math.isfinite(stats[1 - bad_rank]["loss_sum"])
        else:
            assert all(math.isfinite(s["loss_sum"]) for s in stats) and not math.isfinite(stats[0]["grad_norm"])
        weights = group.full_state_dict()
        assert all(torch.equal(weights[n], initial[n]) for n in initial), f"{kind}: a skipped step changed the weights"
        assert ray.get([r.__ray_call__.remote(_version) for r in group.ranks]) == [0, 0]
        assert ray.get(group.ranks[0].__ray_call__.remote(_adam_steps)) == []  # AdamW never stepped
    stats = group.train_step(batches, good, extras)
    lrs.append(group.advance_lr_schedule())
    got = group.full_state_dict()
    group.train_step(batches, good, extras)  # and the step after (the paused optimizer came back in full)
    lrs.append(group.advance_lr_schedule())
    adam_steps = ray.get(group.ranks[0].__ray_call__.remote(_adam_steps))
    versions = ray.get([r.__ray_call__.remote(_version) for r in group.ranks])
    group.shutdown()
    assert [s["skipped"] for s in stats] == [0.0, 0.0]
    assert all(torch.equal(got[n], want[n]) for n in want), "the first good step differs from a first step"
    # cosine from the peak over 4 steps down to half of it: lr(0) = peak, lr(1) = peak (0.5 + 0.5 (1 + cos(pi/4)) / 2);
    # the skipped steps held lr(0)
    peak = TRAINER["lr"]
    assert lrs == pytest.approx([peak, peak, peak, peak * (0.5 + 0.25 * (1 + math.cos(math.pi / 4)))], rel=1e-12)
    assert versions == [2, 2] and adam_steps and set(adam_steps) == {2.0}  # AdamW counted the applied steps only


class NaNFromCall:
    """The SFT ``loss_class`` hook: the token cross-entropy, times NaN from the ``first_bad``-th step on (the
    recipe builds one loss per step, in the driver)."""

    def __init__(self, first_bad: int):
        self.first_bad, self.calls = first_bad, 0

    def __call__(self, step_loss_tokens):
        from train.sft.loss import TokenCrossEntropy

        self.calls += 1
        loss = TokenCrossEntropy(step_loss_tokens)
        return partial(_times_nan, loss) if self.calls >= self.first_bad else loss


def _times_nan(loss, *args):
    value, stats = loss(*args)
    return value * float("nan"), stats


def test_sft_stops_after_max_bad_steps_naming_the_last_good_checkpoint(compose, tmp_path):
    import json

    from train.__main__ import is_user_error, user_message
    from train.sft.recipe import run
    from train.workers.actors import TrainerFailure

    run_dir = tmp_path / "sft"
    base = ["experiment=quickstart", "trainer.max_steps=6", "trainer.save_every=2", "trainer.max_bad_steps=2",
            "trainer.eval_every=0", "trainer.resume=null", "trainer.warmup_steps=0", "data.synthetic.eval.num_samples=2",
            "rollout.max_new_tokens=4", "trainer.row_tokens=256", "data.max_seq_len=256", f"run_dir={run_dir}",
            "cluster.ray_num_cpus=2"]
    try:
        with pytest.raises(TrainerFailure) as raised:
            run(compose(base), loss_class=NaNFromCall(first_bad=3))
    finally:
        ray.shutdown()
    message = user_message(raised.value)
    assert is_user_error(raised.value) and "\n" not in message
    assert message.startswith("trainer.max_bad_steps=2: steps 3-4 in a row had a non-finite loss or gradient and were skipped")
    assert f"The run stopped after step 4; the last good checkpoint is {run_dir}/checkpoints/step_2." in message
    assert message.endswith(f"rerun the same command with run_dir={run_dir} and trainer.resume=auto to continue from it.")
    logged = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/skipped_steps" in r}
    assert [logged[s]["train/skipped_steps"] for s in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 1.0]
    assert "train/loss" not in logged[3]  # NaN is not logged
    assert logged[4]["train/lr"] == logged[3]["train/lr"] < logged[2]["train/lr"]  # the skipped step 3 held the lr


def test_rl_stops_after_max_bad_steps(compose, tmp_path, monkeypatch):
    """The RL loop counts skipped steps the same way (an objective whose loss is NaN from the first step). A
    skipped step's checkpoint (step 1, ``save_every=1``) holds the unchanged weights: a good one to resume from."""
    from tests.train.rl.test_rl import FAST_RL
    from train.rl.recipe import run
    from train.workers.actors import TrainerFailure

    monkeypatch.syspath_prepend(FAULTY)
    monkeypatch.setenv("PYTHONPATH", FAULTY)  # the trainer ranks unpickle the objective from this folder
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    run_dir = tmp_path / "rl"
    cfg = compose(FAST_RL + ["trainer.max_steps=4", "trainer.max_bad_steps=2", "trainer.eval_at_start=false",
                             "algorithm.loss._target_=user_losses.nan_objective", f"run_dir={run_dir}"])
    try:
        with pytest.raises(TrainerFailure, match=r"^trainer\.max_bad_steps=2: steps 1-2 in a row .* The run stopped "
                                                 r"after step 2; the last good checkpoint is .*step_1\..*trainer\.resume=auto"):
            run(cfg)
    finally:
        ray.shutdown()
    import json

    logged = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/skipped_steps" in r]
    assert [(r["step"], r["train/skipped_steps"]) for r in logged] == [(1, 1.0), (2, 1.0)]
