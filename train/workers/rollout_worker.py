"""Rollout worker: generates G responses per prompt with the current policy weights (a Hugging Face model:
train/models/sampling.py's loop: on a KV cache for attention models, on the recurrent state for state-space models).

Runs as a Ray actor (``ray.remote(RolloutWorker)``) or in-process. Every sample records the policy version
that generated it; ``load_weights`` installs the trainer's weights after each update (weight sync).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from train.models.model_zoo import load_model, load_tokenizer
from train.models.runtime import component_dtype
from train.models.sampling import cut_at_eos, left_padded, sample


@dataclass
class Rollout:
    """One sampled response to one prompt."""

    prompt_index: int  # index of the prompt in the request
    prompt_ids: list[int]
    response_ids: list[int]  # generated tokens, ending with eos unless truncated
    response_text: str
    truncated: bool  # hit max_new_tokens without eos
    policy_version: int
    meta: dict = field(default_factory=dict)
    # log-prob of each response token under the distribution the sampler drew it from (log_softmax(logits / T),
    # fp32); None where the backend records none (state-space models' `generate` path). Mismatch correction reads it.
    logprobs: list[float] | None = None


class RolloutWorker:
    def __init__(self, model_path: str, seed: int = 0, device: str = "cpu", num_threads: int | None = None,
                 precision: str = "auto"):
        self.device = torch.device(device)
        if num_threads and self.device.type == "cpu":  # else Ray's default for the actor (1 for num_cpus=0)
            torch.set_num_threads(num_threads)
        self.tokenizer = load_tokenizer(model_path)
        # trainer.precision's rollout dtype (bf16 on a GPU for auto/bf16, fp32 on CPU): train/models/runtime.py
        self.model = load_model(model_path, "sdpa", component_dtype("rollout", precision, self.device), self.device).eval()
        self.version = 0
        self.seed = seed

    def join_weight_group(self, backend: str, address: str, port: int, rank: int, size: int) -> None:
        """Become member ``rank`` of the weight-broadcast group at trainer rank 0's store (rollout.weight_sync=nccl
        or gloo; train/workers/weight_broadcast.py); blocks until every member joins."""
        import ray

        from train.workers.weight_broadcast import BroadcastGroup

        self.weight_group = BroadcastGroup(backend, address, port, rank, size, node=ray.util.get_node_ip_address())

    def receive_weights(self, specs: list, version: int) -> int:
        """Receive the tensors ``specs`` announce from trainer rank 0's broadcast, then ``load_weights`` them."""
        return self.load_weights(self.weight_group.receive_all(specs), version)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """Install trainer weights (names as in ``model.named_parameters()``); returns the new version."""
        missing = [name for name, _ in self.model.named_parameters() if name not in state_dict]
        if missing:
            raise KeyError(f"weight sync: trainer state lacks {missing[:3]}...")
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.copy_(state_dict[name].to(param.dtype))
        self.version = version
        return version

    @torch.no_grad()
    def generate(self, prompts: list[str] | list[list[int]], group_size: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, prompt_offset: int = 0) -> list[Rollout]:
        """``group_size`` samples for each prompt (text, or token ids); rollouts come grouped (prompt 0's group first)."""
        tok = self.tokenizer
        enc = left_padded(tok, prompts, self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        # attention models decode on a KV cache, attention-free ones (Mamba-2) on their recurrent state
        out, logprobs = sample(self.model, enc["input_ids"], enc["attention_mask"], max_new_tokens, tok.eos_token_id,
                               tok.pad_token_id, temperature, top_p, generator, group_size=group_size,
                               return_logprobs=True)
        logprobs = logprobs.tolist()
        rollouts = []
        for i, row in enumerate(out.tolist()):
            p = i // group_size
            response, truncated = cut_at_eos(row, tok.eos_token_id)
            prompt_ids = [t for t, m in zip(enc["input_ids"][p].tolist(), enc["attention_mask"][p].tolist()) if m]
            rollouts.append(Rollout(prompt_offset + p, prompt_ids, response,
                                    tok.decode(response, skip_special_tokens=True), truncated, self.version,
                                    logprobs=logprobs[i][: len(response)]))
        return rollouts

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Plain forward (used to check weight sync)."""
        with torch.no_grad():
            return self.model(input_ids=input_ids.to(self.device)).logits.cpu()
