"""rollout.weight_sync: which path is chosen, the config checks, and the broadcast protocol itself run with gloo on
CPU between real trainer ranks (ZeRO-3 world of 2, so every rank takes part in the gathers) and rollout workers:
the code path of nccl on GPUs with backend=gloo."""

import os

import pytest
from omegaconf import OmegaConf

from tests.conftest import TEST_ARCH
from tests.train.rl.test_rl import FAST_RL
from train.run.config_checks import ConfigError
from train.workers.weight_broadcast import sync_method

ray = pytest.importorskip("ray")


@pytest.mark.parametrize("setting, on_gpu, placement, backend, want", [
    ("auto", False, "colocated", "hf", "object_store"),
    ("auto", False, "disaggregated", "hf", "object_store"),  # CPU: the object store
    ("auto", True, "colocated", "hf", "object_store"),  # a worker shares rank 0's GPU: NCCL would refuse
    ("auto", True, "disaggregated", "hf", "nccl"),
    ("auto", True, "disaggregated", "vllm", "object_store"),
    ("gloo", False, "colocated", "hf", "gloo"),
    ("object_store", True, "disaggregated", "hf", "object_store"),
])
def test_sync_method(setting, on_gpu, placement, backend, want):
    assert sync_method(setting, on_gpu, placement, backend) == want


@pytest.mark.parametrize("override, message", [
    (["rollout.weight_sync=nccl"], r"^rollout\.weight_sync=nccl needs CUDA GPUs \(none found\)"),
    (["rollout.weight_sync=mpi"], r"rollout\.weight_sync='mpi' must be one of auto, object_store, nccl, gloo"),
])
def test_bad_weight_sync_fails_before_any_work(compose, tmp_path, override, message):
    import torch

    from train.rl.recipe import run

    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    with pytest.raises(ConfigError, match=message):
        run(compose(FAST_RL + override + [f"run_dir={tmp_path}/bad"]))
    assert not (tmp_path / "bad").exists()


@pytest.fixture
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _model(cache, seed: int) -> str:
    from train.models.model_zoo import resolve_model_path

    return str(resolve_model_path(OmegaConf.create({"path": None, "cache_dir": str(cache),
                                                    "tiny": {"vocab_size": 384, "seed": seed, "arch": TEST_ARCH}})))


def _worker_state(worker) -> dict:
    return ray.get(worker.__ray_call__.remote(lambda self: {n: p.detach().clone() for n, p in self.model.named_parameters()}))


@pytest.mark.usefixtures("one_thread")
def test_gloo_broadcast_from_zero3_rank0_gives_the_workers_the_trainer_weights(local_ray, model_cache):
    """The workers start from other weights (another seed); one broadcast sync makes every tensor of both workers
    equal to the trainer's exactly (a copy, no arithmetic); a replaced worker gets them too and the next sync forms
    the group again."""
    from tests.train.workers.test_policy_trainer_zero import TRAINER
    from train.workers.actors import RolloutPool, TrainerGroup

    trainer = TrainerGroup(2, _model(model_cache, 5), "sdpa", {**TRAINER, "zero_stage": 3}, 1)
    pool = RolloutPool(2, _model(model_cache, 6), worker_options=[{"num_cpus": 0}] * 2, num_threads=1)
    try:
        want = trainer.full_state_dict()
        before = _worker_state(pool.workers[0])
        assert any(not before[n].equal(t) for n, t in want.items())  # different weights to start with
        pool.use_broadcast(trainer, "gloo")
        pool.sync(want, 1)
        assert pool.weights_ref is None  # nothing went through the object store
        assert ray.get([w.__ray_call__.remote(lambda self: self.version) for w in pool.workers]) == [1, 1]
        for worker in pool.workers:
            got = _worker_state(worker)
            assert got.keys() == want.keys()
            for name, tensor in want.items():
                assert got[name].equal(tensor), name
        first_specs = pool.specs
        assert [n for n, _, _ in first_specs] == list(want)  # every parameter, in order, full (ZeRO-3) shapes
        assert all(tuple(s) == tuple(want[n].shape) for n, s, _ in first_specs)
        pool._replace(1)  # as after a worker died: the new one loads the last weights from the store
        assert pool.specs is None and all(_worker_state(pool.workers[1])[n].equal(t) for n, t in want.items())
        pool.sync(want, 2)  # a new group with the replacement in it
        assert ray.get([w.__ray_call__.remote(lambda self: self.version) for w in pool.workers]) == [2, 2]
    finally:
        pool.shutdown()
        trainer.shutdown()
