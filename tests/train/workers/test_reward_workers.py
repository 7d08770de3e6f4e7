"""Reward workers (train/workers/reward_workers.py): same results as the in-process rewards, a killed worker is replaced
and its share scored once, reward state (Bingo's schedule) survives a replacement, bad settings fail at start."""


import pytest
import torch

from data_pipelines.arithmetic import FILLER_SENTENCES
from rewards.registry import build_reward
from train.run.config_checks import ConfigError

ray = pytest.importorskip("ray")

STATELESS = {
    "correctness": {"_target_": "rewards.correctness.CorrectnessReward", "weight": 1.0},
    "format": {"_target_": "rewards.format.format_reward", "_partial_": True, "weight": 0.5},
}
BINGO = {
    "correctness": {"_target_": "rewards.correctness.CorrectnessReward", "weight": 1.0},
    # schedule from step 0: w_e moves every step, so a lost schedule state changes the rewards
    "bingo": {"_target_": "rewards.bingo.BingoLengthReward", "weight": 1.0, "schedule_start_step": 0,
              "scorer": {"_target_": "rewards.significance.ExactLabelScorer", "filler_sentences": list(FILLER_SENTENCES)}},
}


@pytest.fixture(scope="module")
def ray_session():
    from train.workers.ray_session import init_ray

    init_ray(num_cpus=2)  # a local Ray for this module's actors
    yield
    ray.shutdown()


def _batch(step: int, groups: int = 4, group_size: int = 2):
    """Responses of varying correctness and filler count (so every component varies within a group)."""
    responses, metadata = [], []
    for i in range(groups * group_size):
        fillers = " ".join(FILLER_SENTENCES[: (i + step) % 3])
        answer = 10 + i if (i + step) % 2 else 99
        responses.append(f"<think>5+{5 + i}+0={10 + i}. {fillers}</think>The answer is \\boxed{{{answer}}}.")
        metadata.append({"answer": str(10 + i)})
    return [f"q{i}" for i in range(len(responses))], responses, [[1] * (5 + i) for i in range(len(responses))], metadata


def test_pool_equals_in_process_rewards_and_replaces_a_killed_worker(ray_session):
    from train.workers.reward_workers import RewardPool

    local = build_reward(STATELESS)
    prompts, responses, ids, metadata = _batch(0)
    expected_total, expected_parts, _ = local(prompts, responses, ids, metadata, step=0, group_size=2)
    pool = RewardPool(2, STATELESS)
    pending = pool.submit(prompts, responses, ids, metadata, step=0, group_size=2)
    ray.kill(pool.workers[1])  # mid-call: its first call is still starting math-verify's child process
    total, parts, diagnostics = pending.result()
    assert pool.restarts == 1
    assert torch.equal(total, expected_total)  # every sample scored once, in its place
    assert set(parts) == {"correctness", "format"}
    assert all(torch.equal(parts[k], expected_parts[k]) for k in parts)
    assert expected_total.tolist() != [expected_total[0].item()] * len(responses)  # the test batch varies
    assert diagnostics["correctness/timed_out"].shape == (len(responses),)
    pool.close()
    pool.shutdown()
    local.close()


def test_stateful_reward_keeps_its_state_across_a_replacement(ray_session):
    from train.workers.reward_workers import RewardPool

    local = build_reward(BINGO)
    pool = RewardPool(1, BINGO)
    assert pool.state_dict() == {}
    for step in range(1, 4):
        batch = _batch(step)
        expected = local(*batch, step=step, group_size=2)[0]
        if step == 3:  # the replacement must start from the schedule as it was after step 2
            pending = pool.submit(*batch, step=step, group_size=2)
            ray.kill(pool.workers[0])
            got = pending.result()[0]
        else:
            got = pool(*batch, step=step, group_size=2)[0]
        assert torch.equal(got, expected), step
    assert pool.restarts == 1
    assert pool.state_dict()["bingo"] == local.state_dict()["bingo"]
    assert pool.state_dict()["bingo"]["steps"] == [1, 2, 3]
    # a restored state (resume) gives the same next rewards as the run that kept it
    fresh = RewardPool(1, BINGO)
    fresh.load_state_dict(pool.state_dict())
    assert torch.equal(fresh(*_batch(4), step=4, group_size=2)[0], local(*_batch(4), step=4, group_size=2)[0])
    for p in (pool, fresh):
        p.close()
        p.shutdown()
    local.close()


def test_stateful_reward_on_several_workers_and_bad_settings_fail_at_start(ray_session):
    from train.workers.reward_workers import RewardPool

    with pytest.raises(ConfigError, match=r"rollout\.reward_workers=2: .*set rollout\.reward_workers=1"):
        RewardPool(2, BINGO)
    bad = {"correctness": {**STATELESS["correctness"], "time_limit_s": -1}}
    with pytest.raises(Exception, match=r"reward\.correctness\.time_limit_s must be > 0") as raised:
        RewardPool(1, bad)
    assert not isinstance(raised.value, ray.exceptions.RayError)  # the reward's own error, not Ray's wrapper


def _rollouts(responses, group_size):
    from train.workers.rollout_worker import Rollout

    return [Rollout(i // group_size, [1, 2], [3] * (i + 1), text, False, 0) for i, text in enumerate(responses)]


def test_scoring_started_on_a_running_generation_equals_a_plain_call(ray_session):
    """submit_rollouts gets the generation's object refs; the workers score once the rollouts exist."""
    from data_pipelines.prompts import Prompt
    from train.workers.reward_workers import RewardPool, reward_inputs

    # group k (samples 2k, 2k+1) asks for 10 + k; the first sample answers it, the second answers 99 without tags
    responses = [f"<think>x</think>\\boxed{{{10 + i // 2}}}" if i % 2 == 0 else "\\boxed{99}" for i in range(8)]
    rollouts = _rollouts(responses, 2)
    prompts = [Prompt(f"p{k}", f"q{k}", str(10 + k), {}) for k in range(4)]
    shards = [ray.put(rollouts[:4]), ray.put(rollouts[4:])]  # two rollout workers' shares, in prompt order
    pool = RewardPool(2, STATELESS)
    chained = pool.submit_rollouts(prompts, shards, step=0, group_size=2).result()
    plain = pool(*reward_inputs(prompts, rollouts), step=0, group_size=2)
    assert torch.equal(chained[0], plain[0]) and chained[0].tolist() != [chained[0][0].item()] * 8

    @ray.remote
    def failed_generation():
        raise RuntimeError("rollout worker lost")

    with pytest.raises(ray.exceptions.RayError):  # not retried: the driver scores the regenerated rollouts itself
        pool.submit_rollouts(prompts, [shards[0], failed_generation.remote()], step=0, group_size=2).result()
    assert pool.restarts == 0
    pool.close()
    pool.shutdown()


def test_init_ray_joins_the_running_instance(ray_session):
    from train.workers.ray_session import init_ray

    before = ray.get_runtime_context().get_node_id()
    init_ray()  # already started in this process: nothing changes
    assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == before
