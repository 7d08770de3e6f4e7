"""The vLLM rollout worker's wiring, on CPU, against a stand-in ``vllm`` module installed only inside these tests.

The stand-in records every call and keeps the engine's sleep state as vLLM does (a sleeping engine refuses to
generate, sleeping weights refuse writes), and returns outputs shaped as vLLM V1's ``RequestOutput`` /
``CompletionOutput`` (token ids, finish_reason, per-token ``{token id: Logprob}`` dicts). The real engine has not run
here (no GPU); bench/gpu_check.py runs it against the HF backend on a GPU.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from tests.conftest import TEST_ARCH
from train.run.config_checks import ConfigError, check_vllm
from train.run.vllm_settings import vllm_settings
from train.workers.vllm_worker import VLLMRolloutWorker

LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING")


@dataclass
class Logprob:
    logprob: float
    rank: int


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str
    stop_reason: int | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    prompt_logprobs: list | None
    outputs: list
    finished: bool = True


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def sampled_logprob(prompt: int, sample: int, position: int) -> float:
    return -0.01 * (1 + position + 10 * sample + 100 * prompt)


class FakeModel:
    def __init__(self, llm):
        self.llm = llm
        self.loaded: list[tuple[str, torch.Tensor]] = []

    def load_weights(self, weights):
        assert "weights" not in self.llm.asleep, "weights written while the engine's weights sleep"
        for name, tensor in weights:
            self.loaded.append((name, tensor))
        self.llm.calls.append(("load_weights", len(self.loaded)))


class FakeLLM:
    instances: ClassVar[list] = []  # every engine built in the test, last one last
    tokenizer = None

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.env = {k: os.environ.get(k) for k in LAUNCHER_ENV}
        self.calls: list[tuple] = []
        self.asleep: set[str] = set()
        self.model = FakeModel(self)
        runner = types.SimpleNamespace(model=self.model)
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=runner)))
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return FakeLLM.tokenizer

    def sleep(self, level=1):
        assert not self.asleep, "sleep() on an engine already asleep"
        self.calls.append(("sleep", level))
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags=None):
        tags = list(tags) if tags is not None else ["weights", "kv_cache"]
        assert set(tags) <= self.asleep, f"wake_up({tags}) of memory that is awake"
        self.calls.append(("wake_up", tuple(tags)))
        self.asleep -= set(tags)

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return True

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert not self.asleep, f"generate() while {self.asleep} sleep"
        self.calls.append(("generate", len(prompts)))
        self.last_params = sampling_params
        eos = FakeLLM.tokenizer.eos_token_id
        outputs = []
        for p, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            k = params.kwargs
            samples = []
            for i in range(k["n"]):
                if i % 2 == 0:  # stopped at eos, which ends the token ids
                    tokens, reason = [10 + p, 20 + i, eos], "stop"
                else:  # the budget: eos inside would not matter, finish_reason decides
                    tokens, reason = [30 + i] * k["max_tokens"], "length"
                logprobs = [{t: Logprob(sampled_logprob(p, i, j), 1), t + 1: Logprob(-9.0, 2)}
                            for j, t in enumerate(tokens)] if k.get("logprobs") is not None else None
                samples.append(CompletionOutput(i, "", tokens, None, logprobs, reason))
            outputs.append(RequestOutput(str(p), None, list(prompt["prompt_token_ids"]), None, samples[::-1]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch, tiny_tokenizer):
    """``import vllm`` gives the stand-in; CUDA is reported available (nothing here touches a GPU)."""
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    for key in LAUNCHER_ENV:  # restored after the test
        monkeypatch.setenv(key, "unset")
    FakeLLM.instances, FakeLLM.tokenizer = [], tiny_tokenizer
    return module


def _worker(compose, overrides=(), seed=3):
    cfg = compose(["rollout=vllm", *overrides])
    settings = vllm_settings(cfg.rollout.vllm, cfg.cluster.placement)
    worker = VLLMRolloutWorker("/models/policy", seed=seed, settings=settings, precision=cfg.trainer.precision)
    worker.device = torch.device("cpu")  # the stand-in engine lives on CPU
    return worker, FakeLLM.instances[-1]


def test_engine_arguments_come_from_the_rollout_vllm_keys(fake_vllm, compose):
    worker, llm = _worker(compose, ["rollout.vllm.gpu_memory_utilization=0.45", "rollout.vllm.enforce_eager=true",
                                    "rollout.vllm.max_model_len=512", "rollout.vllm.max_num_batched_tokens=2048"])
    assert llm.kwargs == {
        "model": "/models/policy", "seed": 3, "dtype": "bfloat16", "gpu_memory_utilization": 0.45,
        "tensor_parallel_size": 1, "enforce_eager": True, "max_num_batched_tokens": 2048, "enable_sleep_mode": True,
        "enable_prefix_caching": True, "distributed_executor_backend": "external_launcher",
        "logprobs_mode": "processed_logprobs", "max_model_len": 512,
    }
    # external_launcher: a one-process torch.distributed world, engine core in this process
    assert {k: llm.env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "VLLM_ENABLE_V1_MULTIPROCESSING")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert llm.env["MASTER_PORT"].isdigit()
    assert llm.calls == [("sleep", 1)]  # colocated: asleep until the first generation
    assert worker.dtype == torch.bfloat16


def test_precision_and_placement_decide_dtype_and_sleep_mode(fake_vllm, compose):
    worker, llm = _worker(compose, ["trainer.precision=fp32", "cluster.placement=disaggregated"])
    assert (llm.kwargs["dtype"], llm.kwargs["enable_sleep_mode"], "max_model_len" in llm.kwargs) == ("float32", False, False)
    assert llm.calls == [] and worker.dtype == torch.float32
    _, llm = _worker(compose, ["rollout.vllm.dtype=float32", "rollout.vllm.enable_sleep_mode=false"])
    assert (llm.kwargs["dtype"], llm.kwargs["enable_sleep_mode"]) == ("float32", False)


def test_weight_sync_writes_every_trainer_tensor_in_the_engine_dtype_then_resets_the_prefix_cache(fake_vllm, compose,
                                                                                                tiny_tokenizer):
    from train.models.model_zoo import build_tiny_model

    worker, llm = _worker(compose)
    state = {n: p.detach().clone() for n, p in build_tiny_model(tiny_tokenizer, dict(TEST_ARCH)).named_parameters()}
    assert worker.load_weights(state, 7) == 7 and worker.version == 7
    assert [name for name, _ in llm.model.loaded] == list(state)
    for name, tensor in llm.model.loaded:
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, state[name].to(torch.bfloat16)), name
    # sleep at start-up; only the weights woken for the write; cache reset after it; KV cache still asleep
    assert llm.calls == [("sleep", 1), ("wake_up", ("weights",)), ("load_weights", len(state)), ("reset_prefix_cache",)]
    assert llm.asleep == {"kv_cache"}
    worker.generate([[5, 6]], group_size=2, max_new_tokens=4, seed=0)
    assert llm.calls[4:] == [("wake_up", ("kv_cache",)), ("generate", 1), ("sleep", 1)]
    worker.load_weights(state, 8)  # the next sync wakes the weights again
    assert llm.calls[7:9] == [("wake_up", ("weights",)), ("load_weights", 2 * len(state))]
    with pytest.raises(KeyError, match="weight sync"):
        worker.load_weights({}, 9)


def test_rollouts_are_grouped_versioned_and_carry_truncation_and_sampled_logprobs(fake_vllm, compose, tiny_tokenizer):
    worker, llm = _worker(compose)
    worker.load_weights({"model.embed_tokens.weight": torch.zeros(2, 2)}, 4)
    text = "What is 2+3?"
    rollouts = worker.generate([text, [7, 8, 9]], group_size=3, max_new_tokens=5, temperature=0.7, top_p=0.9,
                               seed=11, prompt_offset=10)
    eos = tiny_tokenizer.eos_token_id
    assert [p.kwargs for p in llm.last_params] == [
        {"n": 3, "temperature": 0.7, "top_p": 0.9, "max_tokens": 5, "seed": 11 + 3 * p, "stop_token_ids": [eos], "logprobs": 0}
        for p in range(2)]
    assert [(r.prompt_index, r.policy_version) for r in rollouts] == [(10, 4)] * 3 + [(11, 4)] * 3
    assert rollouts[0].prompt_ids == tiny_tokenizer.encode(text, add_special_tokens=False)
    assert rollouts[3].prompt_ids == [7, 8, 9]
    for r in rollouts:  # outputs came in reverse index order: sorted back
        p, i = r.prompt_index - 10, rollouts.index(r) % 3
        if i % 2 == 0:
            assert (r.response_ids, r.truncated) == ([10 + p, 20 + i, eos], False)
        else:
            assert (r.response_ids, r.truncated) == ([30 + i] * 5, True)
        assert r.logprobs == [sampled_logprob(p, i, j) for j in range(len(r.response_ids))]  # the sampled token's
        assert r.response_text == tiny_tokenizer.decode(r.response_ids, skip_special_tokens=True)


def test_without_sleep_mode_the_engine_never_sleeps(fake_vllm, compose):
    worker, llm = _worker(compose, ["rollout.vllm.enable_sleep_mode=false"])
    worker.load_weights({"lm_head.weight": torch.ones(2)}, 1)
    worker.generate([[1, 2]], group_size=2, max_new_tokens=3)
    assert [c[0] for c in llm.calls] == ["load_weights", "reset_prefix_cache", "generate"]


def test_building_a_worker_needs_vllm_and_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]'"):
        VLLMRolloutWorker("/models/policy")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="rollout.backend=hf"):
        VLLMRolloutWorker("/models/policy")


def test_unknown_vllm_key_is_named():
    with pytest.raises(ValueError, match="rollout.vllm.gpu_mem"):
        vllm_settings({"gpu_mem": 0.5}, "colocated")


@pytest.mark.parametrize("overrides, on_gpu, installed, key", [
    ([], False, True, "needs a CUDA GPU"),
    ([], True, False, "needs the vllm package"),
    (["rollout.vllm.tensor_parallel_size=2"], True, True, "rollout.vllm.tensor_parallel_size=2"),
    (["rollout.vllm.gpu_memory_utilization=0"], True, True, "rollout.vllm.gpu_memory_utilization=0"),
    (["rollout.vllm.gpu_memory_utilization=1.5"], True, True, "rollout.vllm.gpu_memory_utilization=1.5"),
    # colocated: 2 workers on the one trainer GPU at 0.5 each leave the trainer nothing
    (["rollout.num_workers=2", "rollout.vllm.gpu_memory_utilization=0.5"], True, True, "2 rollout worker"),
    (["rollout.vllm.dtype=float16"], True, True, "rollout.vllm.dtype"),
    (["rollout.vllm.max_model_len=64", "rollout.max_new_tokens=64"], True, True, "rollout.vllm.max_model_len=64"),
    (["+rollout.vllm.typo=1"], True, True, "rollout.vllm.typo"),
])
def test_config_checks_refuse_what_an_engine_cannot_run(compose, overrides, on_gpu, installed, key):
    cfg = compose(["algorithm=grpo", "trainer=rl", "rollout=vllm", *overrides])
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace(".", r"\.")):
        check_vllm(cfg.rollout, cfg.cluster.placement, cfg.trainer.world_size, on_gpu, installed)


def test_config_checks_accept_the_preset(compose):
    cfg = compose(["algorithm=grpo", "trainer=rl", "rollout=vllm"])
    check_vllm(cfg.rollout, cfg.cluster.placement, cfg.trainer.world_size, True, True)
    cfg = compose(["algorithm=grpo", "trainer=rl", "rollout=vllm", "cluster.placement=disaggregated",
                   "rollout.num_workers=2", "rollout.vllm.gpu_memory_utilization=0.9"])
    check_vllm(cfg.rollout, cfg.cluster.placement, cfg.trainer.world_size, True, True)


def test_start_up_hands_the_rollout_vllm_keys_and_the_precision_to_the_pool(compose, monkeypatch):
    """train/rl/startup.py builds the rollout pool with rollout.backend, trainer.precision and the resolved
    rollout.vllm settings (RolloutPool passes them to each VLLMRolloutWorker; other actors stubbed out)."""
    from train.rl import startup
    from train.workers import actors

    pools = []

    class Pool:
        def __init__(self, *args, **kwargs):
            pools.append((args, kwargs))

        def shutdown(self):
            pass

    class Trainer(Pool):
        pass

    monkeypatch.setattr(actors, "RolloutPool", Pool)
    monkeypatch.setattr(actors, "TrainerGroup", Trainer)
    monkeypatch.setattr(startup, "init_ray", lambda *a, **k: None)
    cfg = compose(["algorithm=grpo", "trainer=rl", "rollout=vllm", "trainer.precision=bf16",
                   "rollout.vllm.gpu_memory_utilization=0.4", "rollout.vllm.max_model_len=1024"])
    rewards = types.SimpleNamespace(close=lambda: None)
    with startup.start_actors(cfg, "/start", "/model", rewards, kl_beta=0.0):
        pass
    (args, kwargs), = [p for p in pools if "backend" in p[1]]
    assert args[:2] == (1, "/start") and kwargs["backend"] == "vllm" and kwargs["precision"] == "bf16"
    assert kwargs["vllm_settings"] == {"gpu_memory_utilization": 0.4, "tensor_parallel_size": 1, "enforce_eager": False,
                                       "max_model_len": 1024, "max_num_batched_tokens": 4096, "dtype": "auto",
                                       "enable_sleep_mode": True}  # colocated (cluster=local's placement)


def test_rollout_pool_starts_vllm_workers_with_the_settings(monkeypatch):
    from train.workers import actors

    started = []

    class Actor:
        def __init__(self, cls):
            self.cls = cls

        def options(self, **options):
            self.options_given = options
            return self

        def remote(self, *args, **kwargs):
            started.append((self.cls, self.options_given, args, kwargs))
            return object()

    monkeypatch.setattr(actors.ray, "remote", Actor)
    settings = {"gpu_memory_utilization": 0.4, "enable_sleep_mode": True}
    actors.RolloutPool(2, "/start", seed=5, worker_options=[{"num_gpus": 0.5, "num_cpus": 0}] * 2, backend="vllm",
                       precision="bf16", vllm_settings=settings)
    assert started == [(VLLMRolloutWorker, {"num_gpus": 0.5, "num_cpus": 0}, ("/start", 5 + i),
                        {"settings": settings, "precision": "bf16"}) for i in range(2)]


def test_generation_stops_at_the_chat_templates_end_of_turn(fake_vllm, compose):
    """Gemma's shipped eos is <eos> but its turns end with <end_of_turn>: vLLM stops at both, as the HF worker stops
    at the template's end of turn (train/models/model_zoo.py load_tokenizer)."""
    from tests.data_pipelines.test_chat_templates import family_tokenizer

    gemma = family_tokenizer("gemma-3")
    FakeLLM.tokenizer = gemma
    worker, llm = _worker(compose)
    worker.generate(["2+3?"], group_size=1, max_new_tokens=4)
    stops = llm.last_params[0].kwargs["stop_token_ids"]
    assert stops == [gemma.convert_tokens_to_ids("<end_of_turn>"), gemma.eos_token_id]
    assert gemma.eos_token == "<eos>" and stops[0] != stops[1]
