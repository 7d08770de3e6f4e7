"""Start-up is also the only teardown: every exit from the ``with`` block (an error, Ctrl-C) stops every actor
and removes the placement group; a step hook sees every step without patching."""

import dataclasses

import pytest

from tests.train.rl.test_rl import FAST_RL, VARIED_REWARD, ray_cleanup  # noqa: F401 - fixture


def _gone(handle) -> bool:
    import ray

    try:
        ray.get(handle.__ray_ready__.remote(), timeout=60)
    except ray.exceptions.RayActorError:
        return True
    return False


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_leaving_the_block_stops_every_actor_and_the_placement_group(compose, ray_cleanup, monkeypatch, interrupt):  # noqa: F811
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    import train.workers.placement
    from train.models.model_zoo import resolve_model_path
    from train.rl.startup import start_actors
    from train.workers.ray_session import init_ray

    # AAPO (momentum rollout workers) with a KL reference model and a reward worker: every kind of actor
    cfg = compose(FAST_RL + ["algorithm=aapo", "algorithm.kl.beta=0.01", "trainer.world_size=1"])
    path = str(resolve_model_path(cfg.model))
    # CPU runs reserve no placement group (GPU colocated runs do): give the plan a real one to be removed
    init_ray(num_cpus=cfg.cluster.ray_num_cpus)
    group = placement_group([{"CPU": 0.1}])
    ray.get(group.ready(), timeout=60)
    real_plan = train.workers.placement.plan
    monkeypatch.setattr(train.workers.placement, "plan", lambda *a, **k: dataclasses.replace(real_plan(*a, **k), group=group))
    with pytest.raises(interrupt):
        with start_actors(cfg, path, path, None, kl_beta=0.01) as actors:
            handles = [*actors.trainer.ranks, *actors.rollout_pool.workers, *actors.momentum_pool.workers,
                       actors.reference, *actors.rewards.workers]
            assert not any(_gone(h) for h in handles)  # all started
            raise interrupt("stop")
    assert len(handles) == 1 + 1 + 1 + 1 + 1
    assert all(_gone(h) for h in handles)
    assert placement_group_table(group)["state"] == "REMOVED"
    ray.shutdown()


def test_on_step_sees_every_step_with_its_metrics(compose, tmp_path, ray_cleanup):  # noqa: F811
    from train.rl.recipe import run

    seen = []
    out = run(compose(FAST_RL + VARIED_REWARD + ["trainer.save_every=0", f"run_dir={tmp_path}/rl"]),
              on_step=lambda step, metrics: seen.append((step, metrics["reward/total"])))
    assert [s for s, _ in seen] == [1, 2]
    assert [r for _, r in seen] == [h["reward/total"] for h in out["history"]]


def test_rewards_in_the_driver_give_the_workers_results(compose, tmp_path, ray_cleanup):  # noqa: F811
    """rollout.reward_workers=0 scores in the driver (no reward actor): the same first step as a reward worker."""
    from train.rl.recipe import run

    base = FAST_RL + VARIED_REWARD + ["trainer.max_steps=1", "trainer.save_every=0"]
    in_driver = run(compose(base + ["rollout.reward_workers=0", f"run_dir={tmp_path}/driver"]))["history"][0]
    in_worker = run(compose(base + [f"run_dir={tmp_path}/worker"]))["history"][0]
    for key in ("reward/total", "reward/correctness", "reward/kimi_length", "train/advantage_abs_mean", "train/loss"):
        assert in_driver[key] == in_worker[key], key


@pytest.mark.parametrize("overrides, want", [
    # on-policy: the phases take turns, each gets all 4 cores (trainer ranks 4 // 2, workers 4 // (1 + 1 momentum))
    ([], {"trainer": 2, "rollout": 2, "momentum": 2, "reward": 2, "reference": 4}),
    # async: the rollout side gets 4 // 2 cores (1 per worker); trainer.num_threads overrides the ranks' share (1),
    # and the reference follows the ranks (world_size * trainer.num_threads)
    (["rollout.async_steps=1", "trainer.num_threads=3"], {"trainer": 3, "rollout": 1, "momentum": 1, "reward": 1, "reference": 6}),
])
def test_every_actor_runs_the_documented_torch_thread_count(compose, ray_cleanup, overrides, want):  # noqa: F811
    """train/run/threads.py's table, read back from each actor's torch.get_num_threads() (AAPO + KL + a reward worker,
    2 trainer ranks, 4 local cores)."""
    import ray

    from train.models.model_zoo import resolve_model_path
    from train.rl.startup import start_actors

    cfg = compose(FAST_RL + ["algorithm=aapo", "algorithm.kl.beta=0.01", "trainer.world_size=2",
                             "cluster.ray_num_cpus=4", *overrides])
    path = str(resolve_model_path(cfg.model))

    def threads(handles) -> set:
        return set(ray.get([h.__ray_call__.remote(lambda self: __import__("torch").get_num_threads()) for h in handles]))

    with start_actors(cfg, path, path, None, kl_beta=0.01) as actors:
        seen = {"trainer": threads(actors.trainer.ranks), "rollout": threads(actors.rollout_pool.workers),
                "momentum": threads(actors.momentum_pool.workers), "reward": threads(actors.rewards.workers),
                "reference": threads([actors.reference])}
    assert seen == {k: {v} for k, v in want.items()}
    ray.shutdown()
