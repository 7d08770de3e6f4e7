"""Each policy-optimisation preset of issue 22 runs RL steps through the driver (tiny model, CPU), and the options
that need the driver's help (ReMax's greedy round, the mismatch correction's sampler log-probs) reach the loss."""

import math

import pytest

from tests.train.rl.test_rl import FAST_RL, VARIED_REWARD, ray_cleanup  # noqa: F401  (fixture)
from train.__main__ import run
from train.run.config_checks import ConfigError

ONE_WORKER = ["rollout.num_workers=1", "trainer.save_every=0", *VARIED_REWARD]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gspo", "cispo", "reinforce_pp", "remax", "gpg"])
def test_preset_runs_rl_steps(compose, tmp_path, ray_cleanup, preset):  # noqa: F811
    # ~45 s each on a busy 2-core machine (Ray + DeepSpeed start-up); the rewards run in the driver
    cfg = compose(FAST_RL + ONE_WORKER + [f"algorithm={preset}", "algorithm.group_size=4", "rollout.reward_workers=0",
                                          f"run_dir={tmp_path}/{preset}"])
    out = run(cfg)
    assert out["step"] == 2 and len(out["history"]) == 2
    for metrics in out["history"]:
        assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["train/grad_norm"])
        assert metrics["train/advantage_abs_mean"] > 0  # the varied reward gives every preset a signal
    if preset == "remax":  # the greedy round's rewards are the baseline: A = r - r_greedy
        assert "reward/greedy_baseline" in out["history"][0]
    if preset in ("gspo",):
        assert out["history"][0]["train/ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # one update: s_i = 1
    if preset == "cispo":
        assert out["history"][0]["train/clip_frac"] == 0.0


def test_mismatch_correction_entropy_bonus_and_k3_plus_run_through_the_driver(compose, tmp_path, ray_cleanup):  # noqa: F811
    mismatch = "algorithm.loss.mismatch={_target_:algorithms.mismatch.rollout_correction,_partial_:true,mode:tis,threshold:2.0}"
    cfg = compose(FAST_RL + ONE_WORKER + ["algorithm=grpo", mismatch,
                                          "algorithm.loss.entropy_coef=0.01", "algorithm.kl.beta=0.02",
                                          "algorithm.kl.estimator=k3+", f"run_dir={tmp_path}/tis"])
    out = run(cfg)
    first = out["history"][0]
    # same fp32 weights in the rollout worker and the trainer: the engines agree up to kernel rounding
    assert 0.0 <= first["train/mismatch_kl"] < 1e-4
    assert first["train/mismatch_weight_clip_frac"] == 0.0
    assert first["train/kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the starting policy


@pytest.mark.parametrize("override, message", [
    ("algorithm.loss.entropy_coef=-0.1", r"algorithm\.loss\.entropy_coef=-0\.1 must be >= 0"),
    ("algorithm.kl.estimator=k4", r"algorithm\.kl\.estimator='k4' must be one of"),
    ("algorithm.greedy_rollout=true", r"algorithm\.greedy_rollout=true .* ReMax"),
    ("rollout.temperature=0.7", r"rollout\.temperature=0\.7: set rollout\.temperature=1"),
])
def test_bad_policy_option_fails_before_any_work(compose, tmp_path, override, message):
    mismatch = "algorithm.loss.mismatch={_target_:algorithms.mismatch.rollout_correction,_partial_:true}"
    extra = [mismatch] if override.startswith("rollout.temperature") else []
    cfg = compose(FAST_RL + ["algorithm=grpo", *extra, override, f"run_dir={tmp_path}/bad"])
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "bad").exists()
