"""How one RL step's rollouts become optimizer steps: PPO mini-batches of whole groups, each packed into the
trainer's micro-batches (prompts shared by their group, or packed prompt + response documents)."""

from __future__ import annotations

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


class UpdateBatch(NamedTuple):
    """One optimizer step's micro-batches; ``members[j]``: indices (into the step's rollouts) of micro-batch j's
    responses in its order; token counts for the aggregation normaliser and throughput."""

    micro: list
    members: list[list[int]]
    response_tokens: int
    tokens: int
    samples: int


def pack_update(rollouts, indices: list[int], num_batches: int, *, share_prompt: bool, group_size: int, row_tokens: int,
                attn_backend: str, pad_token_id: int, mask_truncated: bool) -> UpdateBatch:
    """``num_batches`` micro-batches of ``rollouts[indices]``: each prompt computed once for its group
    (``share_prompt``, data_pipelines/shared_prompt.py) when there are enough groups, else packed documents."""
    chosen = [rollouts[i] for i in indices]
    if share_prompt and len(chosen) // group_size >= num_batches:
        micro, members = shared_prompt_batches(chosen, num_batches, pad_token_id, mask_truncated)
        response_tokens = int(sum(int(b.loss_mask.sum()) for b in micro))
        tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in chosen)
    else:
        documents = rollouts_to_documents(chosen, mask_truncated)
        if attn_backend == "sdpa":  # a dense [row, row] mask per row: rows no longer than the longest document
            row_tokens = min(row_tokens, max(len(d) for d in documents))  # (flex and flash skip masked blocks)
        micro, members = pack_balanced(documents, num_batches, row_tokens, pad_token_id)
        response_tokens = sum(sum(d.loss_mask) for d in documents)
        tokens = sum(len(d) for d in documents)
    return UpdateBatch(micro, [[indices[j] for j in m] for m in members], response_tokens, tokens, len(chosen))


def pack_updates(rollouts, micro_batches: int, mini_batches: int, *, share_prompt: bool, group_size: int,
                 row_tokens: int, attn_backend: str, pad_token_id: int, mask_truncated: bool) -> list[UpdateBatch]:
    """The step's optimizer steps: ``mini_batches`` shares of whole groups (fewer when a DAPO step is short of
    groups), each packed into ``micro_batches`` (world_size * micro_batches_per_rank) micro-batches."""
    shares = mini_batch_shares(len(rollouts), group_size,
                               min(mini_batches, len(rollouts) // group_size, len(rollouts) // micro_batches))
    return [pack_update(rollouts, share, micro_batches, share_prompt=share_prompt, group_size=group_size,
                        row_tokens=row_tokens, attn_backend=attn_backend, pad_token_id=pad_token_id,
                        mask_truncated=mask_truncated) for share in shares]
