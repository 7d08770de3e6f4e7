"""A user reward function that raises, returns NaN/inf, the wrong number of values or no numbers, or hangs: the run
stops with one line naming the component and the sample (or the time limit), never a silent zero; in the driver
(rewards/registry.py) and in reward workers (train/workers/reward_workers.py, train/workers/worker_shares.py)."""

import os
import sys
import time
from pathlib import Path

import pytest

from rewards.registry import RewardConfigError, RewardFunctionError, build_reward

HERE = str(Path(__file__).resolve().parent)
sys.path.insert(0, HERE)  # `user_rewards` by `_target_`, as a user's own module

PROMPTS = [f"q{i}" for i in range(4)]
RESPONSES = [f"r{i}" for i in range(4)]
IDS = [[1, 2]] * 4
META = [{"answer": str(i)} for i in range(4)]


def _cfg(target: str, **extra) -> dict:
    return {"ok": {"_target_": "user_rewards.ones", "_partial_": True, "weight": 1.0},
            "mine": {"_target_": f"user_rewards.{target}", "_partial_": True, "weight": 1.0, **extra}}


def _score(reward):
    return reward(PROMPTS, RESPONSES, IDS, META, step=0, group_size=2)


def test_a_raising_reward_names_the_component_the_error_and_the_first_failing_sample():
    with pytest.raises(RewardFunctionError, match=r"^reward\.mine \(fails_on_third\) raised ZeroDivisionError: "
                       r"float division by zero on sample 2 \(prompt 'q2', response 'r2'\): fix the reward function"):
        _score(build_reward(_cfg("fails_on_third")))


@pytest.mark.parametrize("target, message", [
    ("nan_on_second", (r"reward\.mine \(nan_on_second\) returned nan for sample 1 \(prompt 'q1', response 'r1'\) "
                       r"\(1 non-finite of 4, at \[1\]\)")),
    ("one_value_short", r"reward\.mine \(one_value_short\) returned 3 values for a batch of 4"),
    ("text_values", r"reward\.mine \(text_values\) returned list, not one number per sample"),
])
def test_unusable_values_name_the_component(target, message):
    with pytest.raises(RewardFunctionError, match=message):
        _score(build_reward(_cfg(target)))


@pytest.mark.parametrize("target", ["hangs", "swallows_everything"])
def test_a_hanging_reward_stops_at_its_time_limit(target):
    reward = build_reward(_cfg(target, timeout_s=0.5))
    start = time.monotonic()
    with pytest.raises(RewardFunctionError, match=rf"reward\.mine \({target}\) did not return within "
                       r"reward\.mine\.timeout_s=0\.5 s on a batch of 4"):
        _score(reward)
    assert time.monotonic() - start < 10.0  # 0.5 s limit, wide margin for a loaded machine
    assert _score(build_reward(_cfg("ones")))[0].tolist() == [2.0] * 4  # the alarm is gone afterwards


@pytest.mark.parametrize("value", [0, -1, "soon"])
def test_a_bad_timeout_is_refused_when_the_rewards_are_built(value):
    with pytest.raises(RewardConfigError, match=r"reward\.mine\.timeout_s must be a positive number"):
        build_reward(_cfg("ones", timeout_s=value))


def test_reward_errors_print_as_one_line():
    from train.__main__ import is_user_error, user_message

    with pytest.raises(RewardFunctionError) as raised:
        _score(build_reward(_cfg("fails_on_third")))
    assert is_user_error(raised.value) and "\n" not in user_message(raised.value)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    from train.workers.ray_session import init_ray

    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = HERE + (os.pathsep + path if path else "")  # the workers import user_rewards too
    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
    os.environ["PYTHONPATH"] = path


def test_reward_workers_raise_the_functions_own_error(ray_session):
    from train.workers.reward_workers import RewardPool

    pool = RewardPool(2, _cfg("fails_on_third"))
    try:
        with pytest.raises(RewardFunctionError, match=r"reward\.mine \(fails_on_third\) raised ZeroDivisionError: "
                           r"float division by zero on sample 0 \(prompt 'q2', response 'r2'\)") as raised:
            pool(PROMPTS, RESPONSES, IDS, META, step=0, group_size=2)  # worker 1 holds samples 2, 3 (its 0, 1)
        assert not isinstance(raised.value, ray_session.exceptions.RayError)  # unwrapped: one line, no Ray traceback
        hung = RewardPool(1, _cfg("hangs", timeout_s=0.5))
        with pytest.raises(RewardFunctionError, match=r"did not return within reward\.mine\.timeout_s=0\.5 s"):
            hung(PROMPTS, RESPONSES, IDS, META, step=0, group_size=2)
        hung.shutdown()
    finally:
        pool.shutdown()


class _Sleeper:
    def work(self, seconds):
        time.sleep(seconds)
        return seconds


def test_a_wait_past_its_timeout_stops_the_busy_workers_and_says_so(ray_session):
    from train.workers.worker_shares import Shares

    ray = ray_session
    actor = ray.remote(_Sleeper).options(num_cpus=0)
    workers = [actor.remote(), actor.remote()]
    ray.get([w.work.remote(0.0) for w in workers])  # started (actor start-up is not part of the wait under test)
    replaced = []

    def replace(i):
        workers[i] = actor.remote()
        replaced.append(i)

    shares = Shares(workers, 4, 2, lambda w, lo, hi: w.work.remote(0.0 if lo == 0 else 600.0), replace, 3, "sleepers")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^sleepers 1: no result within 2 s; the busy workers were stopped"):
        shares.results(timeout_s=2.0)
    assert time.monotonic() - start < 30.0
    assert replaced == [1]  # only the busy one
    assert ray.get(workers[1].work.remote(0.0)) == 0.0  # its replacement answers
