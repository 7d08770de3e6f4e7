"""Actor placement (train/workers/placement.py). GPU plans run on a Ray instance that declares 2 GPUs on this CPU machine
(Ray only schedules them; nothing touches CUDA), so the GPU each actor would get can be read back."""

import os

import pytest

from train.workers.placement import plan

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def two_gpu_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@ray.remote
class Probe:
    def gpu_ids(self):
        return ray.get_gpu_ids()


def _gpus(options: list[dict]) -> list[list[int]]:
    actors = [Probe.options(**o).remote() for o in options]
    ready, pending = ray.wait([a.gpu_ids.remote() for a in actors], num_returns=len(actors), timeout=60)
    assert not pending, "an actor could not be scheduled: the plan asks for more than the cluster has"
    ids = ray.get(ready)
    for a in actors:
        ray.kill(a)
    return ids


def test_colocated_on_gpus_gives_each_trainer_rank_its_own_gpu_and_workers_share_them(two_gpu_ray):
    places = plan("colocated", True, world_size=2, rollout_workers=2, momentum_workers=2)
    try:
        ids = _gpus(places.trainer + places.rollout + places.momentum + [places.reference])
        trainer, rollout, momentum, reference = ids[:2], ids[2:4], ids[4:6], ids[6]
        assert sorted(g for r in trainer for g in r) == [0, 1]  # no two ranks on one GPU (NCCL refuses that)
        assert rollout == trainer and momentum == trainer  # worker j on rank j's GPU
        assert reference == trainer[0]
        # bundle 0 holds trainer, rollout, momentum and reference: 4 shares of 0.25 fit one GPU
        assert all(o["num_gpus"] == 0.25 for o in places.trainer + places.rollout)
    finally:
        places.remove()


def test_plain_fractional_requests_would_pack_two_ranks_on_one_gpu(two_gpu_ray):
    """Why the bundles: without them Ray puts both 0.5-GPU trainer ranks on GPU 0."""
    assert _gpus([{"num_gpus": 0.5, "num_cpus": 0}] * 2) == [[0], [0]]


def test_disaggregated_and_cpu_plans(two_gpu_ray):
    gpu = plan("disaggregated", True, world_size=1, rollout_workers=1)
    assert sorted(g for r in _gpus(gpu.trainer + gpu.rollout) for g in r) == [0, 1]
    cpu = plan("colocated", False, world_size=2, rollout_workers=3)
    assert cpu.trainer == [{"num_cpus": 1}] * 2 and cpu.rollout == [{"num_cpus": 0}] * 3 and cpu.group is None
    assert plan("disaggregated", False, 1, 1).reward == {"num_cpus": 1}
    with pytest.raises(ValueError, match="cluster.placement='spread' must be colocated or disaggregated"):
        plan("spread", False, 1, 1)
