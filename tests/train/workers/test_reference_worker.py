"""The reference model runs on the device its placement grants, in the trainer's precision."""

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import TEST_ARCH
from train.models.model_zoo import resolve_model_path
from train.workers.placement import plan
from train.workers.reference_worker import ReferenceWorker, reference_settings


@pytest.mark.parametrize("options, precision, device, dtype", [
    ({"num_cpus": 0}, "auto", "cpu", torch.float32),
    ({"num_cpus": 1}, "bf16", "cpu", torch.float32),  # the CPU ranks train in fp32, so does the reference
    ({"num_gpus": 0.33, "num_cpus": 0}, "auto", "cuda", torch.bfloat16),  # a share of a colocated bundle's GPU
    ({"num_gpus": 1, "num_cpus": 1}, "bf16", "cuda", torch.bfloat16),  # disaggregated: a GPU of its own
    ({"num_gpus": 1, "num_cpus": 1}, "fp32", "cuda", torch.float32),
])
def test_device_and_dtype_follow_the_placement_and_the_trainer_precision(options, precision, device, dtype):
    assert reference_settings(options, precision) == {"device": device, "dtype": dtype}


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_cpu_plans_put_the_reference_on_cpu_in_fp32(mode):
    places = plan(mode, on_gpu=False, world_size=2, rollout_workers=1)
    assert reference_settings(places.reference, "auto") == {"device": "cpu", "dtype": torch.float32}


def test_a_bad_precision_names_the_key():
    with pytest.raises(ValueError, match="trainer.precision"):
        reference_settings({"num_cpus": 0}, "fp16")


def test_the_worker_loads_the_weights_in_the_given_dtype(model_cache):
    cfg = OmegaConf.create({"path": None, "cache_dir": str(model_cache), "tiny": {"vocab_size": 384, "seed": 5, "arch": TEST_ARCH}})
    worker = ReferenceWorker(str(resolve_model_path(cfg)), **reference_settings({"num_cpus": 0}, "auto"))
    assert {p.dtype for p in worker.model.parameters()} == {torch.float32}
    bf16 = ReferenceWorker(str(resolve_model_path(cfg)), device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16} and bf16.device == torch.device("cpu")
