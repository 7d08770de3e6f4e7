"""Reference model worker: frozen weights, per-token log-probs on packed micro-batches (Ray actor or in-process)."""

from __future__ import annotations

import torch

from data_pipelines.packing import PackedBatch
from train.models.forward import set_logits_chunk_tokens, token_logprobs
from train.models.model_zoo import load_model
from train.models.runtime import component_dtype
from train.run.threads import set_threads
from train.workers.placement import device_of


def reference_settings(options: dict, precision: str) -> dict:
    """``ReferenceWorker`` keyword arguments for an actor started with Ray ``options``: the device its placement
    grants (cuda with a GPU or a share of one, else cpu) and the trainer's compute dtype for ``trainer.precision``
    (bf16 on GPU for auto/bf16, else fp32), so its log-probs are computed as the policy's are."""
    device = device_of(options)
    return {"device": device, "dtype": component_dtype("reference", precision, device)}


class ReferenceWorker:
    """``logits_chunk_tokens``: ``trainer.logits_chunk_tokens`` (the log-probs computed a chunk of tokens at a time,
    train/models/tiled_logits.py); None: on the full logits. ``num_threads``: torch threads on CPU (train/run/threads.py)."""

    def __init__(self, model_path: str, attn_backend: str = "sdpa", device: str = "cpu", dtype: torch.dtype = torch.float32,
                 logits_chunk_tokens: int | None = None, num_threads: int | None = None):
        self.device = torch.device(device)
        if self.device.type == "cpu":  # train/run/threads.py; None: Ray's setting for the actor
            set_threads(num_threads)
        self.attn_backend = attn_backend
        self.model = load_model(model_path, attn_backend, dtype, self.device).eval()
        set_logits_chunk_tokens(self.model, logits_chunk_tokens)
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, batches: list[PackedBatch]) -> list[torch.Tensor]:
        return [token_logprobs(self.model, b.to(self.device), self.attn_backend)[0].cpu() for b in batches]
