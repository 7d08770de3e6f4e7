"""Format reward: the response follows the think/answer structure (DeepSeek-R1, arXiv 2501.12948).

    r_i = 1.0 if response_i matches  ^\\s*<think>(.+?)</think>\\s*(.+?)\\s*$  (one block each, non-empty)
        else 0.0
Optionally the answer part must contain an ``answer_pattern`` (e.g. \\boxed{...}). Tags are configurable.
"""

from __future__ import annotations

import re

import torch


def format_reward(
    prompts,
    responses,
    response_ids,
    metadata,
    *,
    think_open: str = "<think>",
    think_close: str = "</think>",
    answer_pattern: str | None = r"\\boxed\{.+\}",
    **context,
):
    """[batch] float tensor of 0/1; diagnostics: nothing. Extra context keys are ignored."""
    structure = re.compile(rf"^\s*{re.escape(think_open)}(.+?){re.escape(think_close)}(.+)$", re.DOTALL)
    answer_re = re.compile(answer_pattern, re.DOTALL) if answer_pattern else None
    scores = []
    for response in responses:
        match = structure.match(response)
        ok = (
            match is not None
            and response.count(think_open) == 1
            and response.count(think_close) == 1
            and match.group(1).strip() != ""
            and match.group(2).strip() != ""
            and (answer_re is None or answer_re.search(match.group(2)) is not None)
        )
        scores.append(1.0 if ok else 0.0)
    return torch.tensor(scores, dtype=torch.float32)
