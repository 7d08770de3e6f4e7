"""The RL driver end to end on a tiny model (2 trainer ranks under ZeRO-2, 2 rollout workers), and its
early config errors."""

import json
import os

import pytest

from tests.conftest import rewind_checkpoints
from train.__main__ import run
from train.run.config_checks import ConfigError

FAST_RL = [
    "experiment=quickstart_rl",
    "trainer.max_steps=2",
    "rollout.prompts_per_step=2",
    "algorithm.group_size=4",
    "rollout.max_new_tokens=12",
    "trainer.eval_every=0",
    "trainer.save_every=1",
    "trainer.resume=null",
    "data.synthetic.eval.num_samples=4",
    "cluster.ray_num_cpus=2",
]

# The random test model never answers correctly; the Kimi length reward on characters still differs within a
# group, so advantages are non-zero and the policy moves.
VARIED_REWARD = ["reward=[correctness,kimi_length]", "reward.kimi_length.length_unit=chars"]


@pytest.fixture
def ray_cleanup():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    yield
    import ray

    ray.shutdown()


def test_rl_driver_runs_steps_syncs_weights_and_checkpoints(compose, tmp_path, ray_cleanup):
    cfg = compose(FAST_RL + ["trainer.world_size=2", "trainer.zero_stage=2", "rollout.num_workers=2", f"run_dir={tmp_path}/rl",
                            "reward=[correctness,format,bingo]"])
    out = run(cfg)
    assert out["step"] == 2 and len(out["history"]) == 2
    first, second = out["history"]
    assert first["rollout/policy_version"] == 0 and second["rollout/policy_version"] == 1  # synced after step 1
    # one optimizer step per RL step: pi_old is the update's own detached log-probs (no extra forward)
    assert first["train/optimizer_steps"] == 1 and first["train/ratio_mean"] == pytest.approx(1.0, abs=1e-7)
    assert "perf/time_old_logprobs" not in first
    for key in ("reward/total", "reward/correctness", "reward/format", "reward/bingo", "rollout/response_length_mean", "train/entropy",
                "train/grad_norm", "perf/time_generation", "perf/time_reward", "perf/time_update", "perf/time_weight_sync"):
        assert key in second
    ckpt = tmp_path / "rl" / "checkpoints" / "step_2"
    assert (ckpt / "config.json").exists() and (ckpt / "deepspeed").is_dir()
    rows = [json.loads(l) for l in open(tmp_path / "rl" / "metrics.jsonl")]
    assert {r["step"] for r in rows} >= {0, 1, 2}


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.zero_stage=4", r"trainer\.zero_stage=4"),
        ("rollout.backend=vllm", r"rollout\.backend=vllm needs a CUDA GPU"),
        ("trainer.world_size=64", r"trainer\.world_size=64 exceeds"),
        ("algorithm.group_size=1", r"algorithm\.group_size=1"),
        ("algorithm=dapo", r"algorithm\.overlong_penalty\.cache_len=32"),  # budget of 12 tokens in FAST_RL
        ("rollout.async_steps=2", r"rollout\.async_steps=2 must be 0"),
        ("rollout.num_threads=0", r"rollout\.num_threads=0 must be >= 1"),
        ("trainer.ppo_mini_batches=3", r"trainer\.ppo_mini_batches=3 must be an integer in \[1, rollout\.prompts_per_step=2\]"),
        ("rollout.reward_workers=-1", r"rollout\.reward_workers=-1 must be an integer >= 0"),
        ("cluster.placement=disaggregated", r"cluster\.placement=disaggregated needs 3 CPUs .* Ray has 2"),
    ],
)
def test_bad_rl_config_fails_before_any_work(compose, tmp_path, override, message):
    cfg = compose(FAST_RL + [override, f"run_dir={tmp_path}/bad"])
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("async_steps", [0, 1])
def test_rl_resume_replays_the_same_steps(compose, tmp_path, ray_cleanup, async_steps):
    """Kill after step 1 (simulated: drop later checkpoints), resume: steps 2-3 give the same metrics.

    The random test model never answers correctly; length rewards that differ within a group make the updates
    move the weights, so this checks the replay of prompts, sampling seeds, policy versions, optimizer state and
    log-prob/entropy forwards after a restore. On-policy, the reward is Bingo's with its dynamic schedule from
    step 0 (on zero accuracy w_e falls every step): the checkpoint keeps the schedule (else step 3 differs).
    With async_steps=1 the rollouts of step 2 were sampled before the checkpoint of step 1 by the weights before
    update 1: the checkpoint keeps them (without them the resumed step 2 would sample with newer weights)."""

    base = FAST_RL + ["trainer.max_steps=3", "trainer.keep_last=3", "rollout.max_new_tokens=24",
                      f"rollout.async_steps={async_steps}"]
    base += VARIED_REWARD if async_steps else ["reward=[correctness,bingo]", "reward.bingo.schedule_start_step=0"]
    full = run(compose(base + [f"run_dir={tmp_path}/full"]))
    run(compose(base + [f"run_dir={tmp_path}/cut"]))
    rewind_checkpoints(tmp_path / "cut", 1)
    resumed = run(compose(base + [f"run_dir={tmp_path}/cut", "trainer.resume=auto"]))
    assert resumed["step"] == 3 and len(resumed["history"]) == 2
    for expected, got in zip(full["history"][1:], resumed["history"]):
        same = {k: v for k, v in expected.items() if not k.startswith("perf/")}
        assert {k: got[k] for k in same} == pytest.approx(same, rel=1e-6, abs=1e-7)


def test_async_rollouts_are_one_version_old_and_overlap_the_update(compose, tmp_path, ray_cleanup):
    """rollout.async_steps=1: step 1 trains on rollouts of the initial weights (sampled during update 0), step 2
    on those of version 1 (the workers finish a generation before they load newer weights)."""
    cfg = compose(FAST_RL + VARIED_REWARD + ["trainer.max_steps=3", "rollout.async_steps=1", "trainer.save_every=0",
                                             f"run_dir={tmp_path}/async"])
    out = run(cfg)
    versions = [h["rollout/policy_version"] for h in out["history"]]
    assert versions == [0, 0, 1]
    assert [h["rollout/staleness"] for h in out["history"]] == [0, 1, 1]
    sync = run(compose(FAST_RL + VARIED_REWARD + ["trainer.max_steps=3", "trainer.save_every=0", f"run_dir={tmp_path}/sync"]))
    assert [h["rollout/policy_version"] for h in sync["history"]] == [0, 1, 2]
    # the first step samples the same prompts with the same seed and weights either way
    assert out["history"][0]["reward/total"] == pytest.approx(sync["history"][0]["reward/total"])
    assert out["history"][0]["rollout/response_length_mean"] == sync["history"][0]["rollout/response_length_mean"]


@pytest.mark.parametrize(
    "cores, world, workers, overlap, expected",
    [
        (2, 1, 1, False, (2, 2)),  # alternate phases: each takes every core
        (2, 1, 1, True, (1, 1)),  # overlapped: half each
        (16, 2, 2, True, (4, 4)),
        (16, 2, 1, False, (8, 16)),
        (1, 1, 1, True, (1, 1)),  # never 0 threads
    ],
)
def test_cpu_thread_split(cores, world, workers, overlap, expected):
    from train.run.threads import cpu_threads

    assert cpu_threads(cores, world, workers, overlap, "colocated") == expected
    assert cpu_threads(cores, world, workers, overlap, "disaggregated") == (None, None)


def test_dapo_dynamic_sampling_drops_equal_reward_groups_and_refills(compose, tmp_path, ray_cleanup):
    """On the random test model every group scores 0: each step drops all groups, refills for
    rollout.max_refill_rounds extra rounds, then skips the update instead of training on zero advantages."""
    cfg = compose(FAST_RL + ["algorithm=dapo", "rollout.max_refill_rounds=1", "algorithm.mask_truncated=true",
                             "algorithm.overlong_penalty=null",  # its length shaping would make rewards differ
                             f"run_dir={tmp_path}/dapo"])
    out = run(cfg)
    assert out["step"] == 2 and out["history"] == []
    rows = [json.loads(l) for l in open(tmp_path / "dapo" / "metrics.jsonl")]
    skipped = [r for r in rows if r.get("train/skipped_update") == 1.0]
    assert [r["step"] for r in skipped] == [1, 2]
    assert all(r["rollout/dropped_groups"] == 2 * 2 and r["rollout/sampling_rounds"] == 2 for r in skipped)


def test_dapo_overlong_penalty_and_truncation_mask_train(compose, tmp_path, ray_cleanup):
    """The soft overlong penalty makes rewards differ by length, so groups survive dynamic sampling and the
    update runs with truncated responses masked out of the loss."""
    cfg = compose(FAST_RL + ["algorithm=dapo", "algorithm.overlong_penalty.cache_len=4", "algorithm.mask_truncated=true",
                             f"run_dir={tmp_path}/dapo2"])
    out = run(cfg)
    assert out["history"], "no step kept any group"
    for metrics in out["history"]:
        assert -1.0 <= metrics["reward/overlong_penalty"] <= 0.0
        assert metrics["rollout/kept_groups"] >= 1


def test_aapo_samples_the_momentum_model_and_checkpoints_its_ema(compose, tmp_path, ray_cleanup):
    """AAPO: a second rollout pool samples the momentum model; with alpha < 1 its EMA weights move towards the
    policy after each update and are saved inside the checkpoint (resume restores them)."""
    import torch

    cfg = compose(FAST_RL + ["algorithm=aapo", "algorithm.momentum.alpha=0.5", f"run_dir={tmp_path}/aapo", *VARIED_REWARD])
    out = run(cfg)
    assert out["step"] == 2 and all("reward/momentum_total" in m for m in out["history"])
    ckpt = tmp_path / "aapo" / "checkpoints" / "step_2"
    momentum = torch.load(ckpt / "momentum_model.pt")
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    from train.models.model_zoo import resolve_model_path

    start = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model)).state_dict()
    name = next(k for k in momentum if k.endswith("q_proj.weight"))
    # two EMA steps with alpha 0.5: m2 = 0.25 * theta_0 + 0.25 * theta_1 + 0.5 * theta_2, strictly between start and policy
    moved, gap = (momentum[name] - start[name]).norm(), (policy[name] - start[name]).norm()
    assert 0 < moved < gap


def test_kl_in_reward_penalises_rewards_before_advantages(compose, tmp_path, ray_cleanup):
    """kl.placement=reward with beta > 0: rewards get -beta * sum_t KL (reference actor started); the task reward
    is logged apart. At step 1 policy == reference, so the penalty is exactly 0; after an update it is not."""
    cfg = compose(FAST_RL + ["algorithm.kl.beta=0.5", "algorithm.kl.placement=reward", "algorithm.kl.estimator=k1",
                             "trainer.lr=1e-3", f"run_dir={tmp_path}/klr", *VARIED_REWARD])
    out = run(cfg)
    first, second = out["history"]
    assert first["reward/total"] == pytest.approx(first["reward/task"], abs=1e-6)
    assert second["reward/total"] != pytest.approx(second["reward/task"], abs=1e-6)
    assert "perf/time_reference" in second


def test_trainer_failure_stops_with_a_clear_message_and_keeps_the_last_checkpoint(compose, tmp_path, ray_cleanup):
    """A trainer rank killed mid-run: the driver stops with TrainerFailure naming the last good checkpoint, which
    is intact and resumes."""
    import threading
    import time

    import ray

    from train.run.checkpoint import latest
    from train.workers.actors import TrainerFailure

    run_dir = tmp_path / "fail"
    cfg = compose(FAST_RL + ["trainer.max_steps=40", "trainer.world_size=2", "trainer.zero_stage=1", f"run_dir={run_dir}"])
    killed = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not (run_dir / "checkpoints" / "step_1").exists():
            time.sleep(0.2)
        for name in ray.util.list_named_actors():
            if name.startswith("policy_trainer_") and name.endswith("_1"):
                ray.kill(ray.get_actor(name))
                killed.append(name)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    with pytest.raises(TrainerFailure, match=r"last good checkpoint is .*step_\d+.*trainer\.resume=auto"):
        run(cfg)
    watcher.join(timeout=5)
    assert killed, "the watcher found no trainer rank to kill"
    last = latest(run_dir)
    assert last is not None and (last / "trainer_state.pt").exists() and (last / "deepspeed").is_dir()
    ray.shutdown()
    resumed = run(compose(FAST_RL + ["trainer.max_steps=" + str(int(last.name.split("_")[1]) + 1), "trainer.world_size=2",
                                     "trainer.zero_stage=1", f"run_dir={run_dir}", "trainer.resume=auto"]))
    assert resumed["step"] == int(last.name.split("_")[1]) + 1


def test_band_sampler_and_multi_turn_rollouts_run_through_the_driver(compose, tmp_path, ray_cleanup):
    """sampler=band gets each rollout's correctness (its tracker state is checkpointed); multi-turn chats are
    rolled out turn by turn and trained as single-pass documents; sample tables and length histograms logged."""
    import torch

    cfg = compose(FAST_RL + ["sampler=band", "rollout.multi_turn=true", "data.synthetic.train.turns=2",
                             "trainer.max_steps=1", f"run_dir={tmp_path}/mt"])
    out = run(cfg)
    (metrics,) = out["history"]
    assert metrics["sampler/seen_fraction"] == pytest.approx(2 / 2000)  # 2 prompts of the 2000 rolled out
    state = torch.load(tmp_path / "mt" / "checkpoints" / "step_1" / "trainer_state.pt", weights_only=False)
    assert len(state["sampler"]["tracker"]["stats"]) == 2  # the 2 prompts' pass-rate counts
    samples = [json.loads(l) for l in open(tmp_path / "mt" / "samples.jsonl")]
    assert any(s["table"] == "rollout/samples" and "reward_correctness" in s for s in samples)
    rows = [json.loads(l) for l in open(tmp_path / "mt" / "metrics.jsonl")]
    assert any("rollout/response_length_hist_p90" in r for r in rows)


@pytest.mark.parametrize("sampler", ["uniform", "band", "schedule"])
def test_samplers_get_the_prompts_as_objects(compose, tiny_tokenizer, sampler):
    """Prompts (and their metadata: lists, dicts) reach every sampler unchanged, not as OmegaConf containers
    (reward functions such as Bingo's exact-label scorer read list metadata)."""
    from data_pipelines.arithmetic import ArithmeticSpec, generate
    from data_pipelines.prompts import Prompt, to_prompts
    from train.rl.setup import make_sampler

    cfg = compose(["experiment=quickstart_rl", f"sampler={sampler}"])
    prompts = to_prompts(tiny_tokenizer, generate(ArithmeticSpec(verbosity=1.0), 12, seed=3))
    batch = make_sampler(cfg.sampler, prompts, 4, 0).next()
    assert len(batch) == 4 and all(type(p) is Prompt and type(p.meta["filler_sentences"]) is list for p in batch)


def test_ppo_mini_batches_step_the_optimizer_per_share_against_the_sampling_policy(compose, tmp_path, ray_cleanup):
    """trainer.ppo_mini_batches=2: two optimizer steps per RL step, each on one prompt's group. pi_old is recorded
    before the first (the sampling policy), so the second mini-batch sees moved weights (mean ratio != 1); with one
    optimizer step pi_old is the update's own detached log-probs (ratio exactly 1: the first driver test)."""
    cfg = compose(FAST_RL + VARIED_REWARD + ["trainer.max_steps=1", "trainer.save_every=0", "trainer.lr=1e-2",
                                             "trainer.ppo_mini_batches=2", f"run_dir={tmp_path}/mini"])
    split = run(cfg)["history"][0]
    assert split["train/optimizer_steps"] == 2 and "perf/time_old_logprobs" in split
    assert abs(split["train/ratio_mean"] - 1.0) > 1e-4
