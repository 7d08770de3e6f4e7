"""vLLM rollout worker (``rollout.backend=vllm``): RolloutWorker's interface on a vLLM engine, for GPUs.

The engine runs in the worker's own process (its Ray actor, on the GPU Ray gave it), as TRL's colocate mode runs it
(trl/generation/vllm_generation.py of the pinned TRL): ``LLM(..., distributed_executor_backend="external_launcher")``
keeps vLLM V1's engine core in-process (no engine-core subprocess), so the model is reachable at
``llm.llm_engine.model_executor.driver_worker.model_runner.model`` and weight sync writes the trainer's tensors
with the model's own ``load_weights`` (HF names; vLLM maps them onto its fused layers), then clears the prefix
cache, whose entries were computed with the old weights. ``external_launcher`` takes its torch.distributed world
from the environment (RANK, WORLD_SIZE, ...): a world of one process per worker, set up here.

Sleep mode (``rollout.vllm.enable_sleep_mode``, on by default when colocated with the trainer): after each
generation the engine sleeps at level 1 (weights copied to CPU memory, KV cache freed), so the trainer's update has
the GPU memory; ``load_weights`` wakes the weights before writing them (TRL does the same: writing into unmapped
memory crashes) and ``generate`` wakes the KV cache.

Each sample carries vLLM's log-prob of each sampled token (``Rollout.logprobs``; ``logprobs_mode=processed_logprobs``:
after temperature / top-p, as sampled) for diagnostics only: the log-probs of the update always come from the
trainer's forward. The dtype follows ``trainer.precision`` (train/models/runtime.py ``component_dtype``): bf16 on a
GPU for auto/bf16.

Importing this module does not need vllm (the config checks and tests import it); building a worker does, and a
CUDA GPU: ``train.run.config_checks.check_vllm`` refuses the backend before any work otherwise. Not run on a GPU
yet (see README, "GPU paths"); tests/train/workers/test_vllm_worker.py checks the wiring against a stand-in vllm.
"""

from __future__ import annotations

import os
import socket

import torch

from data_pipelines.chat_format import end_of_turn_token
from train.models.runtime import component_dtype
from train.run.vllm_settings import DTYPES, vllm_settings
from train.workers.rollout_worker import Rollout

SLEEP_LEVEL = 1  # weights kept in CPU memory while asleep: a wake-up restores the last loaded weights


def engine_dtype(settings: dict, precision: str) -> torch.dtype:
    """``rollout.vllm.dtype``, or for ``auto`` the rollout dtype of ``trainer.precision`` on a GPU."""
    if settings["dtype"] == "auto":
        return component_dtype("rollout", precision, "cuda")
    if settings["dtype"] not in DTYPES:
        raise ValueError(f"rollout.vllm.dtype={settings['dtype']!r} must be auto, bfloat16 or float32")
    return DTYPES[settings["dtype"]]


def engine_kwargs(model_path: str, seed: int, settings: dict, precision: str) -> dict:
    """The ``vllm.LLM`` arguments of a worker (TRL's colocate arguments, ours from ``rollout.vllm``)."""
    kwargs = {
        "model": model_path,
        "seed": seed,
        "dtype": str(engine_dtype(settings, precision)).removeprefix("torch."),
        "gpu_memory_utilization": float(settings["gpu_memory_utilization"]),
        "tensor_parallel_size": int(settings["tensor_parallel_size"]),
        "enforce_eager": bool(settings["enforce_eager"]),
        "max_num_batched_tokens": int(settings["max_num_batched_tokens"]),
        "enable_sleep_mode": bool(settings["enable_sleep_mode"]),
        "enable_prefix_caching": True,  # the G samples of a prompt share its prefill
        "distributed_executor_backend": "external_launcher",  # engine in this process: the model is reachable
        "logprobs_mode": "processed_logprobs",  # sampled tokens' log-probs after temperature / top-p
    }
    if settings["max_model_len"] is not None:
        kwargs["max_model_len"] = int(settings["max_model_len"])
    return kwargs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def external_launcher_env(tensor_parallel_size: int) -> dict[str, str]:
    """The torch.distributed environment of a one-process world for ``external_launcher`` (this worker alone)."""
    if tensor_parallel_size != 1:
        raise ValueError(f"rollout.vllm.tensor_parallel_size={tensor_parallel_size}: a rollout worker holds one GPU; "
                         "set it to 1 and add GPUs through rollout.num_workers")
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


class VLLMRolloutWorker:
    """``generate`` / ``load_weights`` of train/workers/rollout_worker.py's RolloutWorker on a vLLM engine."""

    def __init__(self, model_path: str, seed: int = 0, settings: dict | None = None, precision: str = "auto"):
        if not torch.cuda.is_available():
            raise RuntimeError("rollout.backend=vllm needs a CUDA GPU; use rollout.backend=hf on this machine")
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("rollout.backend=vllm needs the vllm package: pip install -e '.[vllm]' "
                              "(or use rollout.backend=hf)") from err
        settings = vllm_settings(settings, "colocated")  # resolved already by the pool's caller; an unresolved auto: on
        kwargs = engine_kwargs(model_path, seed, settings, precision)
        os.environ.update(external_launcher_env(kwargs["tensor_parallel_size"]))
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        # stop where the HF worker stops: the chat template's end-of-turn token (Gemma: <end_of_turn>, not <eos>)
        end_of_turn = self.tokenizer.convert_tokens_to_ids(end_of_turn_token(self.tokenizer))
        self.stop_token_ids = list(dict.fromkeys([end_of_turn, self.tokenizer.eos_token_id]))
        self.dtype = engine_dtype(settings, precision)
        self.device = torch.device("cuda")  # where the weights go before load_weights (Ray's GPU is this process's cuda)
        self.sleep_mode = kwargs["enable_sleep_mode"]
        self.asleep: set[str] = set()  # the engine's sleeping memory: subset of {"weights", "kv_cache"}
        self.version = 0
        self._sleep()  # until the first generation: the trainer builds its engine meanwhile

    # -- sleep mode ------------------------------------------------------------------------------------------
    def _sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=SLEEP_LEVEL)
            self.asleep = {"weights", "kv_cache"}

    def _wake(self, *tags: str) -> None:
        sleeping = [t for t in tags if t in self.asleep]
        if sleeping:
            torch.cuda.empty_cache()  # the trainer's cached blocks back to the driver first (TRL does the same)
            self.llm.wake_up(tags=sleeping)
            self.asleep -= set(sleeping)

    def _model(self):
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    # -- RolloutWorker's interface ---------------------------------------------------------------------------
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """Install trainer weights (names as in the HF model's ``named_parameters()``); returns the new version."""
        if not state_dict:
            raise KeyError("weight sync: the trainer sent no weights")
        self._wake("weights")
        self._model().load_weights((name, t.to(device=self.device, dtype=self.dtype)) for name, t in state_dict.items())
        self.llm.reset_prefix_cache()  # cached prefixes hold keys/values of the old weights
        self.version = version
        return version

    def generate(self, prompts: list[str] | list[list[int]], group_size: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, prompt_offset: int = 0) -> list[Rollout]:
        """``group_size`` samples for each prompt (text, or token ids); rollouts come grouped (prompt 0's group first)."""
        from vllm import SamplingParams

        tok = self.tokenizer
        ids = [p if not isinstance(p, str) else tok.encode(p, add_special_tokens=False) for p in prompts]
        # vLLM seeds sample i of a request with its seed + i: prompt p's seed + p * group_size keeps every sample's apart
        params = [SamplingParams(n=group_size, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 seed=None if seed is None else seed + p * group_size, stop_token_ids=self.stop_token_ids,
                                 logprobs=0)
                  for p in range(len(ids))]
        self._wake("weights", "kv_cache")
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        self._sleep()
        rollouts = []
        for p, output in enumerate(outputs):
            for sample in sorted(output.outputs, key=lambda o: o.index):
                response = list(sample.token_ids)
                logprobs = None
                if sample.logprobs is not None:  # one {token id: Logprob} per sampled token, the sampled one included
                    logprobs = [float(lp[t].logprob) for t, lp in zip(response, sample.logprobs)]
                rollouts.append(Rollout(prompt_offset + p, ids[p], response, tok.decode(response, skip_special_tokens=True),
                                        sample.finish_reason == "length", self.version, logprobs=logprobs))
        return rollouts

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """vLLM's log-prob of every token of each sequence after the first (prompt log-probs; bench/gpu_check.py
        compares them with the trainer's after a weight sync)."""
        from vllm import SamplingParams

        self._wake("weights", "kv_cache")
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in sequences],
                                    SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0), use_tqdm=False)
        self._sleep()
        return [[float(lp[t].logprob) for t, lp in zip(s[1:], out.prompt_logprobs[1:])] for s, out in zip(sequences, outputs)]
