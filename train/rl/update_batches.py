"""How one RL step's rollouts become optimizer steps: PPO mini-batches of whole groups, each packed into the
trainer's micro-batches (prompts shared by their group, or packed prompt + response documents).

The number of micro-batches of a mini-batch is either fixed (``trainer.micro_batches_per_rank`` on each rank) or, with
``trainer.max_tokens_per_micro_batch``, as many as its tokens need (verl's dynamic batch size,
``use_dynamic_bsz`` / ``ppo_max_token_len_per_gpu``): the fewest multiple of the trainer ranks whose balanced split
keeps every micro-batch within the budget, so every rank gets the same count and near-equal tokens.
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

from data_pipelines.multiturn import document_from_prompts
from data_pipelines.packing import Document, pack_balanced, response_loss_masks
from data_pipelines.shared_prompt import shared_prompt_batches


def rollouts_to_documents(rollouts, mask_truncated: bool = False) -> list[Document]:
    """prompt + response as one document; the loss covers the response tokens only (none at all for a
    truncated response when ``mask_truncated``: DAPO's overlong filtering). A multi-turn rollout becomes one
    single-pass multi-turn document (data_pipelines/multiturn.py) holding all its turns."""
    documents = []
    for i, r in enumerate(rollouts):
        if "turn_prompts" in r.meta:
            loss = response_loss_masks([len(resp) for resp in r.meta["turn_responses"]], r.meta["turn_truncated"], mask_truncated)
            documents.append(document_from_prompts(r.meta["turn_prompts"], r.meta["turn_responses"], loss, sample_id=str(i)))
        else:
            documents.append(Document(r.prompt_ids + r.response_ids,
                                      [False] * len(r.prompt_ids) + response_loss_masks([len(r.response_ids)], [r.truncated], mask_truncated)[0],
                                      sample_id=str(i)))
    return documents


def mini_batch_shares(num_rollouts: int, group_size: int, mini_batches: int) -> list[list[int]]:
    """Rollout indices of each PPO mini-batch: contiguous shares of whole groups, as equal as they divide."""
    groups = num_rollouts // group_size
    return [list(range(groups * k // mini_batches * group_size, groups * (k + 1) // mini_batches * group_size))
            for k in range(mini_batches)]


def largest_bin(sizes: list[int], num_bins: int) -> int:
    """The heaviest bin's total when ``balanced_bins`` (data_pipelines/packing.py) splits ``sizes`` into ``num_bins``:
    the same rule (largest first, each into the lightest bin, the lower index on ties), on a heap."""
    loads = [(0, b) for b in range(num_bins)]  # a valid heap: ordered by (load, bin)
    for size in sorted(sizes, reverse=True):
        load, b = heapq.heappop(loads)
        heapq.heappush(loads, (load + size, b))
    return max(load for load, _ in loads)


def budget_micro_batches(sizes: list[int], max_tokens: int, multiple: int) -> int:
    """Micro-batches for items of ``sizes`` tokens under a budget of ``max_tokens`` tokens each: the fewest multiple of
    ``multiple`` (the trainer ranks), from ceil(sum / max_tokens) up, whose balanced split keeps every micro-batch
    within the budget. Never more than the items fill (the largest multiple <= len(sizes), at least ``multiple``):
    a mini-batch of too few items for the count it needs gets that many, and some may exceed the budget."""
    most = max(multiple, len(sizes) // multiple * multiple)
    count = min(most, math.ceil(max(1, math.ceil(sum(sizes) / max_tokens)) / multiple) * multiple)
    while count < most and largest_bin(sizes, count) > max_tokens:
        count += multiple
    return count


def prompt_group_tokens(rollouts) -> list[int]:
    """Tokens of each prompt group as ``shared_prompt_batches`` forms them (consecutive rollouts of one prompt):
    the prompt once plus its responses."""
    groups: list[list[int]] = []
    for i, r in enumerate(rollouts):
        if groups and rollouts[groups[-1][0]].prompt_index == r.prompt_index and rollouts[groups[-1][0]].prompt_ids == r.prompt_ids:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [len(rollouts[g[0]].prompt_ids) + sum(len(rollouts[i].response_ids) for i in g) for g in groups]


class UpdateBatch(NamedTuple):
    """One optimizer step's micro-batches; ``members[j]``: indices (into the step's rollouts) of micro-batch j's
    responses in its order; token counts for the aggregation normaliser and throughput."""

    micro: list
    members: list[list[int]]
    response_tokens: int
    tokens: int
    samples: int


def pack_update(rollouts, indices: list[int], num_batches: int, *, share_prompt: bool, group_size: int, row_tokens: int,
                attn_backend: str, pad_token_id: int, mask_truncated: bool, max_tokens: int | None = None) -> UpdateBatch:
    """``num_batches`` micro-batches of ``rollouts[indices]``: each prompt computed once for its group
    (``share_prompt``, data_pipelines/shared_prompt.py) when there are enough groups, else packed documents.
    With ``max_tokens`` (a token budget per micro-batch), ``num_batches`` is the trainer ranks and the count is
    the fewest multiple of them the budget needs (``budget_micro_batches``: over prompt groups when each group fits
    the budget and there are enough groups, else over the prompt + response documents)."""
    chosen = [rollouts[i] for i in indices]
    ranks = num_batches  # with max_tokens: the count is a multiple of the ranks
    if max_tokens is not None and share_prompt:
        group_tokens = prompt_group_tokens(chosen)
        num_batches = budget_micro_batches(group_tokens, max_tokens, ranks)
        share_prompt = max(group_tokens) <= max_tokens and len(group_tokens) >= num_batches
    if share_prompt and len(chosen) // group_size >= num_batches:
        micro, members = shared_prompt_batches(chosen, num_batches, pad_token_id, mask_truncated)
        response_tokens = int(sum(int(b.loss_mask.sum()) for b in micro))
        tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in chosen)
    else:
        documents = rollouts_to_documents(chosen, mask_truncated)
        if max_tokens is not None:
            num_batches = budget_micro_batches([len(d) for d in documents], max_tokens, ranks)
        if attn_backend == "sdpa":  # a dense [row, row] mask per row: rows no longer than the longest document
            row_tokens = min(row_tokens, max(len(d) for d in documents))  # (flex and flash skip masked blocks)
        micro, members = pack_balanced(documents, num_batches, row_tokens, pad_token_id)
        response_tokens = sum(sum(d.loss_mask) for d in documents)
        tokens = sum(len(d) for d in documents)
    return UpdateBatch(micro, [[indices[j] for j in m] for m in members], response_tokens, tokens, len(chosen))


def pack_updates(rollouts, micro_batches: int, mini_batches: int, *, share_prompt: bool, group_size: int,
                 row_tokens: int, attn_backend: str, pad_token_id: int, mask_truncated: bool,
                 max_tokens: int | None = None) -> list[UpdateBatch]:
    """The step's optimizer steps: ``mini_batches`` shares of whole groups (fewer when a DAPO step is short of
    groups), each packed into ``micro_batches`` (world_size * micro_batches_per_rank) micro-batches; with
    ``max_tokens`` (trainer.max_tokens_per_micro_batch) ``micro_batches`` is world_size and each share gets the
    multiple of it that its tokens need."""
    shares = mini_batch_shares(len(rollouts), group_size,
                               min(mini_batches, len(rollouts) // group_size, len(rollouts) // micro_batches))
    return [pack_update(rollouts, share, micro_batches, share_prompt=share_prompt, group_size=group_size,
                        row_tokens=row_tokens, attn_backend=attn_backend, pad_token_id=pad_token_id,
                        mask_truncated=mask_truncated, max_tokens=max_tokens) for share in shares]
