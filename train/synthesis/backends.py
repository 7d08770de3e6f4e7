"""Text generation backends for the synthesis stages (data_pipelines/synthesis/ generators and solvers receive
one): ``generate(prompts, n, seeds)`` -> n texts per prompt, and ``close()``. ``hf`` runs the RL rollout worker
in-process (train.workers.rollout_worker.RolloutWorker), ``vllm`` runs vLLM on a GPU, ``ray`` spreads prompts over Ray
rollout workers (train.workers.actors.RolloutPool) for scale.

Sampling seeds: ``hf`` and ``vllm`` seed each prompt with its own seed (derived from the run seed and the row
id), so a resumed run samples what an uninterrupted one would; ``ray`` seeds per batch (RolloutPool's API).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MODEL_BACKENDS = ("hf", "vllm", "ray")
REPO = Path(__file__).resolve().parents[2]


def resolve_model(model_path, key: str) -> str:
    """A local HF checkpoint directory; ``embedded`` builds/uses the embedded tiny model (configs/model/tiny.yaml)."""
    if not model_path:
        raise ValueError(f"{key} is required for a model backend: give a local Hugging Face checkpoint directory "
                         "(or 'embedded' for the embedded tiny model)")
    if model_path == "embedded":
        from omegaconf import OmegaConf

        from train.models.model_zoo import resolve_model_path

        tiny = OmegaConf.load(REPO / "configs/model/tiny.yaml")
        tiny.cache_dir = str(REPO / tiny.cache_dir)
        return str(resolve_model_path(tiny))
    if not (Path(model_path) / "config.json").is_file():
        raise FileNotFoundError(f"{key}={model_path!r} has no config.json: give a local Hugging Face checkpoint "
                                "directory (this machine cannot download from a hub)")
    return str(model_path)


class HFBackend:
    """In-process Hugging Face ``generate`` through the RL rollout worker (same prompts, same sampling code)."""

    def __init__(self, model_path: str, max_new_tokens: int, temperature: float, top_p: float, device: str = "cpu"):
        from train.workers.rollout_worker import RolloutWorker

        self.worker = RolloutWorker(model_path, device=device)
        self.sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        self.name = f"hf:{model_path}"

    def generate(self, prompts: list[str], n: int, seeds: list[int]) -> list[list[str]]:
        return [[r.response_text for r in self.worker.generate([p], n, seed=s, **self.sampling)]
                for p, s in zip(prompts, seeds)]

    def close(self) -> None:
        pass


class VLLMBackend:
    """vLLM offline inference (GPU). The import is deferred so CPU machines never need vllm installed."""

    def __init__(self, model_path: str, max_new_tokens: int, temperature: float, top_p: float, key: str,
                 tensor_parallel_size: int = 1):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"{key}=vllm needs a CUDA GPU and none is visible; use {key}=hf on this machine")
        if importlib.util.find_spec("vllm") is None:
            raise ImportError(f"{key}=vllm needs the vllm package (pip install vllm); or use {key}=hf")
        from vllm import LLM

        self.llm = LLM(model=model_path, tensor_parallel_size=tensor_parallel_size)
        self.sampling = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        self.name = f"vllm:{model_path}"

    def generate(self, prompts: list[str], n: int, seeds: list[int]) -> list[list[str]]:
        from vllm import SamplingParams

        params = [SamplingParams(n=n, seed=s, **self.sampling) for s in seeds]
        return [[o.text for o in out.outputs] for out in self.llm.generate(prompts, params)]

    def close(self) -> None:
        pass


class RayBackend:
    """Prompts spread over ``num_workers`` Ray rollout workers (a dead worker is replaced; see RolloutPool)."""

    def __init__(self, model_path: str, max_new_tokens: int, temperature: float, top_p: float, num_workers: int,
                 num_gpus_per_worker: float = 0, ray_address: str | None = None):
        from train.workers.actors import RolloutPool
        from train.workers.ray_session import init_ray

        init_ray(ray_address)
        options = {"num_cpus": 1, "num_gpus": num_gpus_per_worker} if num_gpus_per_worker else {"num_cpus": 0}
        self.pool = RolloutPool(num_workers, model_path, worker_options=[options] * num_workers)
        self.sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        self.name = f"ray:{model_path}"

    def generate(self, prompts: list[str], n: int, seeds: list[int]) -> list[list[str]]:
        rollouts = self.pool.generate(prompts, n, seed=seeds[0], **self.sampling)
        texts = [r.response_text for r in rollouts]
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

    def close(self) -> None:
        self.pool.shutdown()


def backend_tokenizer(cfg, key: str):
    """The tokenizer of the model ``cfg`` names: its chat template renders the prompts sent to the backend."""
    from train.models.model_zoo import load_tokenizer

    return load_tokenizer(resolve_model(cfg.get("model_path"), f"{key}.model_path"))


def build_backend(cfg, key: str):
    """The text backend that ``cfg`` (a generator or solver section) names; ``key`` is its config path."""
    backend = cfg.backend
    if backend not in MODEL_BACKENDS:
        raise ValueError(f"{key}.backend={backend!r} is not a model backend; choose one of {list(MODEL_BACKENDS)}")
    model_path = resolve_model(cfg.get("model_path"), f"{key}.model_path")
    sampling = {"max_new_tokens": int(cfg.max_new_tokens), "temperature": float(cfg.temperature), "top_p": float(cfg.top_p)}
    if backend == "hf":
        return HFBackend(model_path, device=cfg.get("device", "cpu"), **sampling)
    if backend == "vllm":
        return VLLMBackend(model_path, key=f"{key}.backend", tensor_parallel_size=int(cfg.get("tensor_parallel_size", 1)), **sampling)
    return RayBackend(model_path, num_workers=int(cfg.get("num_workers", 1)),
                      num_gpus_per_worker=float(cfg.get("num_gpus_per_worker", 0)), ray_address=cfg.get("ray_address"), **sampling)
