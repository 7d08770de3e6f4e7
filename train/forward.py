"""The forward pass shared by SFT and RL: per-token log-probs (and entropy) on packed rows.

Position t's logits predict token t+1, so every returned tensor is [rows, seq - 1] and aligned with
``batch.input_ids[:, 1:]`` / ``batch.labels[:, 1:]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_pipelines.packing import IGNORE_INDEX, PackedBatch
from train.attention import model_inputs


def token_logprobs(
    model, batch: PackedBatch, backend: str, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(x_{t+1} | x_{<=t}) for every position, [rows, seq-1]; entropy of pi(.|x_{<=t}) if asked."""
    logits = model(**model_inputs(batch, backend), use_cache=False).logits[:, :-1].float()  # [rows, seq-1, vocab]
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = batch.input_ids[:, 1:]  # [rows, seq-1]
    logprobs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logprobs, entropy


def sft_loss_sum(model, batch: PackedBatch, backend: str) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over loss tokens, number of loss tokens). Divide by the total over the
    accumulation window so that gradient accumulation equals one large batch."""
    logits = model(**model_inputs(batch, backend), use_cache=False).logits[:, :-1].float()
    targets = batch.labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


def per_document(values: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the loss-token entries of ``values`` [rows, seq-1] into one row per document.

    Returns (``out`` [num_docs, max_loss_tokens], ``mask`` [num_docs, max_loss_tokens]) in the order of
    ``batch.sample_ids``, so that per-sequence losses (algorithms/) can run on packed rows: position t of a
    row predicts token t+1, which belongs to document ``doc_ids[:, t+1]``.
    """
    trained = batch.labels[:, 1:] != IGNORE_INDEX  # [rows, seq-1]
    doc = batch.doc_ids[:, 1:][trained]  # [n] document of each trained position, row-major = sequence order
    picked = values[trained]  # [n]
    num_docs = len(batch.sample_ids)
    counts = torch.bincount(doc, minlength=num_docs)  # [docs]
    width = int(counts.max()) if len(counts) else 0
    order = torch.argsort(doc, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(doc), device=values.device) - starts[doc[order]]
    out = values.new_zeros(num_docs, width)
    mask = torch.zeros(num_docs, width, dtype=torch.bool, device=values.device)
    out[doc[order], slot] = picked[order]
    mask[doc[order], slot] = True
    return out, mask
