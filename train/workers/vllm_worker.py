"""vLLM rollout worker (``rollout.backend=vllm``): RolloutWorker's interface on a vLLM engine, for GPUs.

GPU only, and only with the ``vllm`` package installed: ``train.run.config_checks.check_rl`` refuses the backend
before any work otherwise, and importing this module without vllm raises an ImportError that says so. The
engine runs inside the worker's Ray actor, on the GPU Ray gave it. Weight sync writes the trainer's tensors
into the engine's model with the model's own ``load_weights`` (as TRL's colocate mode does) and clears the
prefix cache, whose entries were computed with the old weights.

Not exercised by CI (no GPU there); the Hugging Face worker (train/workers/rollout_worker.py) is the tested default
and the two return the same ``Rollout`` records.
"""

from __future__ import annotations

import torch

from train.workers.rollout_worker import Rollout

try:
    from vllm import LLM, SamplingParams
except ImportError as err:  # pragma: no cover - depends on the machine
    raise ImportError("rollout.backend=vllm needs the vllm package (pip install vllm) and a CUDA GPU; "
                      "use rollout.backend=hf otherwise") from err


class VLLMRolloutWorker:
    def __init__(self, model_path: str, seed: int = 0, gpu_memory_utilization: float = 0.3, max_model_len: int = 4096):
        if not torch.cuda.is_available():
            raise RuntimeError("rollout.backend=vllm needs a CUDA GPU; use rollout.backend=hf on this machine")
        self.llm = LLM(model=model_path, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, enable_prefix_caching=True)
        self.tokenizer = self.llm.get_tokenizer()
        self.version = 0

    def _model(self):
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        self._model().load_weights(list(state_dict.items()))
        self.llm.reset_prefix_cache()
        self.version = version
        return version

    def generate(self, prompts: list[str] | list[list[int]], group_size: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, prompt_offset: int = 0) -> list[Rollout]:
        tok = self.tokenizer
        ids = [p if not isinstance(p, str) else tok.encode(p, add_special_tokens=False) for p in prompts]
        params = SamplingParams(n=group_size, temperature=temperature, top_p=top_p, top_k=-1, max_tokens=max_new_tokens,
                                seed=seed, stop_token_ids=[tok.eos_token_id])
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        rollouts = []
        for p, output in enumerate(outputs):
            for sample in output.outputs:
                response = list(sample.token_ids)
                truncated = sample.finish_reason == "length"
                rollouts.append(Rollout(prompt_offset + p, ids[p], response, tok.decode(response, skip_special_tokens=True),
                                        truncated, self.version))
        return rollouts
