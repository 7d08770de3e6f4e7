"""Reduce a per-token loss [batch, resp_len] to a scalar. One explicit option, because the choice changes
the effective weight of each token and of each response (a known source of silent bugs).

    token-mean                mean over every counted token in the batch (DAPO, arXiv 2503.14476;
                              TRL loss_type "bnpo", and "dapo" with the global token count as normaliser)
    seq-mean-token-mean       mean over responses of each response's token mean (original GRPO,
                              DeepSeekMath 2402.03300; TRL loss_type "grpo")
    seq-mean-token-sum-norm   sum over all tokens / (num_responses * max_response_len), a constant
                              normaliser (Dr.GRPO, arXiv 2503.20783; TRL loss_type "dr_grpo")

``normalizer`` lets the caller pass the global count (tokens for token-mean, responses for the
seq-mean modes) when a batch is split into micro-batches or across ranks, so that the summed gradient
equals the gradient of the full-batch loss. Rows with no counted token contribute 0 (their denominator
is clamped to 1, as in TRL) and still count as a response in the seq-mean modes.
"""

from __future__ import annotations

import torch

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate_loss(
    per_token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    mode: str = "token-mean",
    max_response_len: int | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar loss from per_token_loss [batch, resp_len] and response_mask [batch, resp_len] (1 = counted)."""
    if mode not in MODES:
        raise ValueError(f"algorithm.aggregation.mode must be one of {MODES}, got {mode!r}")
    if per_token_loss.shape != response_mask.shape:
        raise ValueError(
            f"per_token_loss {tuple(per_token_loss.shape)} and response_mask {tuple(response_mask.shape)} differ"
        )
    mask = response_mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask  # [batch, resp_len]
    if mode == "token-mean":
        denom = mask.sum().clamp(min=1.0) if normalizer is None else normalizer
        return masked.sum() / denom
    num_seqs = per_token_loss.shape[0] if normalizer is None else normalizer
    if mode == "seq-mean-token-mean":
        seq_means = masked.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)  # [batch]
        return seq_means.sum() / num_seqs
    if max_response_len is None or max_response_len <= 0:
        raise ValueError(
            "algorithm.aggregation.max_response_len must be a positive constant (the generation budget, "
            "rollout.max_new_tokens) for seq-mean-token-sum-norm"
        )
    return masked.sum() / (num_seqs * max_response_len)
