"""Length-reward baselines that Bingo is compared against. Both need correctness: they read it from
``components["correctness"]`` (computed earlier in the same batch) or, failing that, ``metadata["correct"]``.
Lengths are response token counts (``len(response_ids[i])``); set ``length_unit: chars`` for characters
(what open-r1's implementations use).
"""

from __future__ import annotations

import math

import torch


def _correct(components, metadata, batch: int) -> torch.Tensor:
    if components and "correctness" in components:
        return components["correctness"] > 0.5
    if all("correct" in m for m in metadata):
        return torch.tensor([bool(m["correct"]) for m in metadata])
    raise ValueError(
        "length rewards need correctness: select it before them (reward=[correctness,...]) "
        f"or give metadata['correct'] for all {batch} samples"
    )


def _lengths(responses, response_ids, unit: str) -> torch.Tensor:
    if unit == "tokens":
        return torch.tensor([len(ids) for ids in response_ids], dtype=torch.float64)
    if unit == "chars":
        return torch.tensor([len(r) for r in responses], dtype=torch.float64)
    raise ValueError(f"reward.*.length_unit must be 'tokens' or 'chars', got {unit!r}")


def kimi_length_reward(
    prompts, responses, response_ids, metadata, *, group_size: int = 1, components=None, length_unit="tokens", **context
):
    """Kimi k1.5 length penalty (arXiv 2501.12599, sec. 2.3.3), per group of responses to one prompt:

        lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)
        r_i = lambda_i if correct_i else min(0, lambda_i)        (0 for the whole group if max_len == min_len)
    """
    batch = len(responses)
    correct = _correct(components, metadata, batch)
    lengths = _lengths(responses, response_ids, length_unit).view(-1, group_size)  # [num_groups, G]
    lo, hi = lengths.min(dim=1, keepdim=True).values, lengths.max(dim=1, keepdim=True).values
    span = hi - lo
    lam = torch.where(span > 0, 0.5 - (lengths - lo) / span.clamp(min=1e-12), torch.zeros_like(lengths))
    lam = lam.reshape(-1)
    reward = torch.where(correct, lam, lam.clamp(max=0.0))
    return reward.to(torch.float32)


def cosine_length_reward(
    prompts,
    responses,
    response_ids,
    metadata,
    *,
    components=None,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_len: int = 1000,
    length_unit: str = "tokens",
    **context,
):
    """Cosine length-scaled reward (Yeo et al., arXiv 2502.03373; open-rs / open-r1 ``cosine`` reward).

        c_i = cos(pi * len_i / max_len)
        correct: r_i = min_c + 0.5 * (max_c - min_c) * (1 + c_i)   (shorter correct -> closer to max_c = 1.0)
        wrong:   r_i = max_w + 0.5 * (min_w - max_w) * (1 + c_i)   (shorter wrong   -> closer to min_w = -1.0)
    Defaults are open-r1's (-1.0, -0.5, 0.5, 1.0, max_len 1000). It *replaces* the correctness reward
    (AAPO's release trains with format + 2.0 * cosine); len_i > max_len is clamped to max_len.
    """
    batch = len(responses)
    correct = _correct(components, metadata, batch)
    lengths = _lengths(responses, response_ids, length_unit).clamp(max=max_len)
    cosine = torch.cos(lengths / max_len * math.pi)  # [batch]
    low = torch.where(correct, torch.tensor(min_value_correct, dtype=torch.float64), torch.tensor(max_value_wrong, dtype=torch.float64))
    high = torch.where(correct, torch.tensor(max_value_correct, dtype=torch.float64), torch.tensor(min_value_wrong, dtype=torch.float64))
    return (low + 0.5 * (high - low) * (1.0 + cosine)).to(torch.float32)
