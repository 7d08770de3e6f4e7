"""Per-token log-probs and entropy from hidden states, chunk by chunk over tokens (``trainer.logits_chunk_tokens``).

The logits of a row are tokens x vocabulary floats: 16k tokens x 150k vocabulary is 9.8 GB in fp32, before
``log_softmax`` doubles it and autograd keeps it for the backward. Here the output head runs on ``chunk_tokens``
hidden states at a time; each chunk returns only

    log pi(y_t | x_{<=t}) = z_{t, y_t} / tau - logsumexp_j(z_{t, j} / tau)
    H_t = -sum_j p_{t, j} log p_{t, j},      p_t = softmax(z_t / tau),   z_t = W h_t (+ b)

([chunk] each), and runs under ``torch.utils.checkpoint`` (non-reentrant): the forward keeps only the chunk's hidden
states (a view of the backbone's output, held anyway), and the backward recomputes one chunk's logits at a time. So
neither pass holds more than [chunk_tokens, vocab] of logits, whatever the row length (the same idea as DeepSpeed's
``TiledFusedLogitsLoss`` and Liger-Kernel's fused linear cross-entropy; those reduce to a scalar loss inside the
forward, which RL cannot use: its objective needs the per-token log-probs and entropy themselves). The checkpointed
graph reaches the head's weight once per chunk, and autograd sums those contributions before the weight's single
gradient accumulation, so DeepSpeed's gradient hooks fire once per parameter, as in the full path.

The numbers are those of ``label_logprobs`` on the full logits (the same ops per token); only the summation order of
the head's weight gradient over chunks differs (float rounding).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


class _Entropy(torch.autograd.Function):
    """H = -sum_j p_j log p_j from log-probs [..., vocab]. Saves only its input, which log_softmax's backward keeps
    anyway (so no second vocab-sized tensor is held, as ``-(lp.exp() * lp).sum(-1)`` under autograd would);
    dH/dlog p_j = -p_j (log p_j + 1)."""

    @staticmethod
    def forward(ctx, log_probs):
        ctx.save_for_backward(log_probs)
        return -(log_probs.exp() * log_probs).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        (log_probs,) = ctx.saved_tensors
        return -grad.unsqueeze(-1) * log_probs.exp() * (log_probs + 1.0)


def label_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log pi(target) [...], entropy [...] or None) from ``logits`` [..., vocab] (any float dtype; computed in fp32)
    and ``targets`` [...]. The entropy is differentiable (the RL entropy bonus) when the logits require grad."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    logprobs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = _Entropy.apply(log_probs) if log_probs.requires_grad else -(log_probs.exp() * log_probs).sum(-1)
    return logprobs, entropy


class _ChunkHead:
    """The head + ``label_logprobs`` on one chunk, as one checkpointable callable (state on an object, no closure)."""

    def __init__(self, head: torch.nn.Module, temperature: float, with_entropy: bool):
        self.head, self.temperature, self.with_entropy = head, temperature, with_entropy

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logprobs, entropy = label_logprobs(self.head(hidden), targets, self.temperature, self.with_entropy)
        return torch.stack([logprobs, entropy]) if entropy is not None else logprobs[None]  # [1 or 2, chunk]


def chunked_token_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    chunk_tokens: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``label_logprobs(head(hidden), targets, ...)`` without the full logits: ``hidden`` [..., d] (the states that
    predict ``targets`` [...], e.g. [rows, seq-1, d]), ``head`` the output layer (a module: called per chunk, so
    ZeRO-3's gather hooks run as for the whole model), ``chunk_tokens`` tokens per chunk (the last chunk may be
    shorter). Under autograd each chunk is checkpointed, so the backward recomputes one chunk at a time."""
    if chunk_tokens < 1:
        raise ValueError(f"trainer.logits_chunk_tokens={chunk_tokens} must be an integer >= 1 or null")
    shape = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.size(-1))  # [n, d]
    flat_targets = targets.reshape(-1)  # [n]
    run = _ChunkHead(head, temperature, with_entropy)
    grad = torch.is_grad_enabled() and (flat_hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    # split (not slicing in a loop): one SplitBackward joins the chunks' hidden-state gradients, instead of one
    # zero-filled [n, d] tensor per chunk
    pieces = [
        checkpoint(run, h, t, use_reentrant=False) if grad else run(h, t)
        for h, t in zip(flat_hidden.split(chunk_tokens), flat_targets.split(chunk_tokens))
    ]
    if not pieces:
        pieces = [flat_hidden.new_zeros(2 if with_entropy else 1, 0, dtype=torch.float32)]
    logprobs = torch.cat([piece[0] for piece in pieces]).reshape(shape)
    entropy = None
    if with_entropy:  # not a view (clone: [n] floats): a caller may detach_() it in place (train/rl/algorithm.py)
        entropy = torch.cat([piece[1] for piece in pieces]).reshape(shape).clone()
    return logprobs, entropy
