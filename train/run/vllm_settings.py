"""The ``rollout.vllm.*`` settings of the vLLM rollout backend (train/workers/vllm_worker.py): defaults, the
dtypes it takes, and their resolution from the YAML block (configs/rollout/hf.yaml documents each key). Here, below
the workers, so that the config checks (train/run/config_checks.py) read the same defaults."""

from __future__ import annotations

import torch

# rollout.vllm.* keys (configs/rollout/hf.yaml documents each); a key missing from the YAML takes its default here
DEFAULTS = {
    "gpu_memory_utilization": 0.3,  # fraction of the GPU's memory the engine may take (weights + KV cache)
    "tensor_parallel_size": 1,
    "enforce_eager": False,
    "max_model_len": None,  # None: the model's own limit
    "max_num_batched_tokens": 4096,
    "dtype": "auto",  # auto = trainer.precision's rollout dtype
    "enable_sleep_mode": "auto",  # auto = on when cluster.placement=colocated
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def vllm_settings(vllm_cfg, placement: str) -> dict:
    """The worker's settings from the ``rollout.vllm`` block (None or missing keys: ``DEFAULTS``);
    ``enable_sleep_mode: auto`` resolves to whether the workers share their GPU with the trainer."""
    given = dict(vllm_cfg or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"rollout.vllm.{unknown[0]} is not a key; the keys are {sorted(DEFAULTS)}")
    settings = {**DEFAULTS, **given}
    if settings["enable_sleep_mode"] == "auto":
        settings["enable_sleep_mode"] = placement == "colocated"
    return settings
