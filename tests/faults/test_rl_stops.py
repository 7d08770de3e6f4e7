"""A reward that starts failing mid-run stops the RL run with one message that names the reward, the sample, the
step reached and the last good checkpoint; that checkpoint resumes (train/rl/recipe.py)."""

from pathlib import Path

import pytest

from tests.train.rl.test_rl import FAST_RL, ray_cleanup  # noqa: F401 - fixture
from train.__main__ import is_user_error, user_message

USER_REWARDS = str(Path(__file__).resolve().parent)


def test_a_reward_failing_mid_run_names_the_last_good_checkpoint_and_resume_continues(compose, tmp_path, ray_cleanup,  # noqa: F811
                                                                                      monkeypatch):
    from rewards.registry import RewardFunctionError
    from train.rl.recipe import run

    monkeypatch.syspath_prepend(USER_REWARDS)
    monkeypatch.setenv("PYTHONPATH", USER_REWARDS)  # the reward worker imports the user's module too
    run_dir = tmp_path / "rl"
    mine = "+reward.mine={_target_:user_rewards.%s,_partial_:true,weight:1.0}"
    base = FAST_RL + ["reward=[correctness]", "trainer.max_steps=2", f"run_dir={run_dir}"]
    with pytest.raises(RewardFunctionError) as raised:
        run(compose(base + [mine % "fails_from_second_step"]))
    message = user_message(raised.value)
    assert is_user_error(raised.value) and "\n" not in message
    assert message.startswith("reward.mine (fails_from_second_step) raised KeyError: 'difficulty' on sample 0 (prompt ")
    assert f"The run stopped after step 1; the last good checkpoint is {run_dir}/checkpoints/step_1." in message
    assert message.endswith(f"rerun the same command with run_dir={run_dir} and trainer.resume=auto to continue from it.")
    import ray

    ray.shutdown()
    resumed = run(compose(base + [mine % "ones", "trainer.resume=auto"]))  # the fixed reward, same run dir
    assert resumed["step"] == 2 and len(resumed["history"]) == 1  # only step 2 ran
