"""Every wait of the driver on an actor has a limit (``cluster.actor_timeout_s``): a trainer rank or rollout worker
that sleeps past it stops the call with ``ActorTimeout`` naming the actor and what it was doing, never a hang
(train/workers/actors.py); the RL recipe adds the last good checkpoint and the resume command."""

import time

import pytest

from tests.conftest import tiny_model_path

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def path(model_cache):
    return tiny_model_path(model_cache, seed=5)


def _sleep(module):
    time.sleep(600)  # a rank stuck (in a collective, on a lost node): far past the limit under test


class _StuckWorker:
    """Answers nothing: stands in for a rollout worker on a hung GPU."""

    def generate(self, *args, **kwargs):
        time.sleep(600)

    def load_weights(self, *args, **kwargs):
        time.sleep(600)


def test_a_trainer_rank_past_the_limit_is_named_with_its_call(ray_session, path):
    from train.workers.actors import ActorTimeout, TrainerFailure, TrainerGroup

    group = TrainerGroup(1, path, "sdpa", {"lr": 1e-3, "zero_stage": 0}, micro_batches_per_rank=1, timeout_s=120)
    group.timeout_s = 1.5  # start-up had its own (generous) limit; the call under test gets a tiny one
    start = time.monotonic()
    try:
        with pytest.raises(ActorTimeout, match=r"^policy trainer rank 0 \(policy_trainer_[0-9a-f]{8}_0\) gave no answer to "
                                               r"a model change within cluster\.actor_timeout_s=1\.5 s$") as raised:
            group.apply_to_model(_sleep)
    finally:
        group.shutdown()
    assert time.monotonic() - start < 30
    assert isinstance(raised.value, TrainerFailure)  # the recipes' stop path (one line, last good checkpoint)


def test_a_rollout_worker_past_the_limit_is_killed_replaced_and_named(ray_session, path):
    from train.workers.actors import ActorTimeout, RolloutPool

    pool = RolloutPool(1, path, timeout_s=1.5)
    try:
        pool.workers[0] = ray.remote(_StuckWorker).options(num_cpus=0).remote()
        start = time.monotonic()
        with pytest.raises(ActorTimeout, match=r"^rollout workers 0: no result within 1\.5 s; the busy workers were stopped "
                                               r"\(replaced for the next call\) while generating the rollouts of 2 prompts"):
            pool.generate([[1, 2, 3], [4, 5]], group_size=2, seed=0, max_new_tokens=2)
        assert time.monotonic() - start < 30
        assert pool.restarts == 1  # the stuck worker was killed and replaced: the pool can go on
        pool.timeout_s = 120  # the replacement's start-up (loading the model) is part of its first call
        assert len(pool.generate([[1, 2, 3]], group_size=2, seed=0, max_new_tokens=2)) == 2
        pool.timeout_s = 1.5
        pool.workers[0] = ray.remote(_StuckWorker).options(num_cpus=0).remote()
        with pytest.raises(ActorTimeout, match=r"^rollout worker 0 gave no answer to the weight sync to version 3 within "
                                               r"cluster\.actor_timeout_s=1\.5 s$"):
            pool.sync({}, 3)
    finally:
        pool.shutdown()


class _StuckReference:
    """A KL reference model that never answers."""

    def logprobs(self, batches):
        time.sleep(600)


def test_a_stuck_reference_model_is_named_within_the_trainer_limit(ray_session):
    from types import SimpleNamespace

    from train.rl.logprobs import record_logprobs
    from train.rl.step_metrics import PhaseTimer
    from train.workers.actors import ActorTimeout

    reference = ray.remote(_StuckReference).options(num_cpus=0).remote()
    trainer = SimpleNamespace(timeout_s=1.5)  # record_logprobs reads the trainer group's limit
    updates = [SimpleNamespace(micro=[object()])]
    start = time.monotonic()
    try:
        with pytest.raises(ActorTimeout, match=r"^the KL reference model gave no answer to reference log-probs within "
                                               r"cluster\.actor_timeout_s=1\.5 s$"):
            record_logprobs(trainer, reference, updates, need_old=False, timer=PhaseTimer())
    finally:
        ray.kill(reference)
    assert time.monotonic() - start < 30


def test_rl_start_up_past_the_limit_stops_with_the_resume_command(compose, tmp_path):
    from tests.train.rl.test_rl import FAST_RL
    from train.__main__ import is_user_error, user_message
    from train.rl.recipe import run
    from train.workers.actors import ActorTimeout

    run_dir = tmp_path / "rl"
    with pytest.raises(ActorTimeout) as raised:
        try:
            run(compose(FAST_RL + ["cluster.actor_timeout_s=0.01", f"run_dir={run_dir}"]))
        finally:
            ray.shutdown()
    message = user_message(raised.value)
    assert is_user_error(raised.value)
    assert message.startswith("policy trainer rank 0 (policy_trainer_")
    assert "gave no answer to the rendezvous within cluster.actor_timeout_s=0.01 s. The run stopped during start-up; " \
           "the last good checkpoint is none (no checkpoint was saved yet)." in message
    assert message.endswith(f"rerun the same command with run_dir={run_dir} and trainer.resume=auto to continue from it.")


@pytest.mark.parametrize("value", [0, -1, "soon", True])
def test_a_bad_limit_names_the_key(compose, value):
    from train.run.config_checks import ConfigError, check_fault_limits

    with pytest.raises(ConfigError, match=r"^cluster\.actor_timeout_s=.* must be a number of seconds > 0"):
        check_fault_limits(compose([f"cluster.actor_timeout_s={value}"]))
    with pytest.raises(ConfigError, match=r"^trainer\.max_bad_steps=.* must be an integer >= 1"):
        check_fault_limits(compose([f"trainer.max_bad_steps={value}"]))
    check_fault_limits(compose(["cluster.actor_timeout_s=null", "trainer.max_bad_steps=null"]))  # no limits
