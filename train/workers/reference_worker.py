"""Reference model worker: frozen weights, per-token log-probs on packed micro-batches (Ray actor or in-process)."""

from __future__ import annotations

import torch

from data_pipelines.packing import PackedBatch
from train.models.forward import token_logprobs
from train.models.model_zoo import load_model


class ReferenceWorker:
    def __init__(self, model_path: str, attn_backend: str = "sdpa", device: str = "cpu"):
        self.device = torch.device(device)
        self.attn_backend = attn_backend
        self.model = load_model(model_path, attn_backend, torch.float32, self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, batches: list[PackedBatch]) -> list[torch.Tensor]:
        return [token_logprobs(self.model, b.to(self.device), self.attn_backend)[0].cpu() for b in batches]
