"""RL micro-batches whose prompt is computed once per group: G responses share their prompt's keys and values.

GRPO-style algorithms sample G responses per prompt. Packed as G separate documents, every prompt token runs
through the model G times in the update (and in every log-prob forward). A ``SharedPromptBatch`` holds each
prompt once and its responses apart; train/models/forward.py runs the prompts first (KV cache kept with its autograd
graph), repeats each prompt's keys and values for its responses and runs the responses on top. Each response
sees exactly the context it would see alone (its prompt, then itself), so log-probs and gradients equal the
packed layout's (tested in fp32); gradients through the shared keys and values add up over the group by the
chain rule, as they would over G copies. Single-turn rollouts only (multi-turn chats use the single-pass
multi-turn documents of data_pipelines/multiturn.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data_pipelines.packing import balanced_bins, response_loss_masks


@dataclass
class SharedPromptBatch:
    prompt_ids: torch.Tensor  # [prompts, P] right-padded with pad_token_id
    prompt_lengths: torch.Tensor  # [prompts]
    response_ids: torch.Tensor  # [responses, R] right-padded with pad_token_id
    loss_mask: torch.Tensor  # [responses, R] bool: tokens trained on (all response tokens unless masked)
    response_lengths: torch.Tensor  # [responses]
    owner: torch.Tensor  # [responses] index of each response's prompt
    sample_ids: list[str]  # one per response

    @property
    def num_tokens(self) -> int:
        return self.prompt_ids.numel() + self.response_ids.numel()

    def to(self, device) -> "SharedPromptBatch":
        tensors = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return SharedPromptBatch(**{**vars(self), **tensors})


def collate_groups(prompts: list[list[int]], responses: list[list[list[int]]], loss_masks: list[list[list[bool]]],
                   sample_ids: list[list[str]], pad_token_id: int) -> SharedPromptBatch:
    """One batch from prompt token ids, the responses of each prompt, their loss masks and sample ids."""
    width_p = max(len(p) for p in prompts)
    flat = [(i, r, m, s) for i, (rs, ms, ss) in enumerate(zip(responses, loss_masks, sample_ids)) for r, m, s in zip(rs, ms, ss)]
    width_r = max(1, max(len(r) for _, r, _, _ in flat))
    prompt_ids = torch.full((len(prompts), width_p), pad_token_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        prompt_ids[i, : len(p)] = torch.tensor(p)
    response_ids = torch.full((len(flat), width_r), pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros((len(flat), width_r), dtype=torch.bool)
    for j, (_, r, m, _) in enumerate(flat):
        if len(m) != len(r):
            raise ValueError(f"response {j}: loss mask has {len(m)} entries for {len(r)} tokens")
        response_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        loss_mask[j, : len(r)] = torch.tensor(m, dtype=torch.bool)
    return SharedPromptBatch(
        prompt_ids, torch.tensor([len(p) for p in prompts]), response_ids, loss_mask,
        torch.tensor([len(r) for _, r, _, _ in flat]), torch.tensor([i for i, _, _, _ in flat]), [s for *_, s in flat],
    )


def split_groups(group_tokens: list[int], num_batches: int) -> list[list[int]]:
    """Whole groups into ``num_batches`` bins of near-equal token counts (longest first, to the lightest bin);
    each bin's groups in input order."""
    if len(group_tokens) < num_batches:
        raise ValueError(f"{len(group_tokens)} prompt groups cannot fill {num_batches} micro-batches; lower the micro-batch "
                         "count or set trainer.share_prompt=false")
    return balanced_bins(group_tokens, num_batches)


def shared_prompt_batches(rollouts, num_batches: int, pad_token_id: int, mask_truncated: bool = False
                          ) -> tuple[list[SharedPromptBatch], list[list[int]]]:
    """Micro-batches of whole prompt groups from single-turn rollouts (consecutive rollouts with the same
    prompt form a group). Returns the batches and, for each, the rollout indices in its response order (as
    ``pack_balanced`` does for packed documents)."""
    groups: list[list[int]] = []
    for i, r in enumerate(rollouts):
        if groups and rollouts[groups[-1][0]].prompt_index == r.prompt_index and rollouts[groups[-1][0]].prompt_ids == r.prompt_ids:
            groups[-1].append(i)
        else:
            groups.append([i])
    tokens = [len(rollouts[g[0]].prompt_ids) + sum(len(rollouts[i].response_ids) for i in g) for g in groups]
    batches, members = [], []
    for bin_groups in split_groups(tokens, num_batches):
        chosen = [groups[g] for g in bin_groups]
        batches.append(collate_groups(
            [rollouts[g[0]].prompt_ids for g in chosen],
            [[rollouts[i].response_ids for i in g] for g in chosen],
            [response_loss_masks([len(rollouts[i].response_ids) for i in g], [rollouts[i].truncated for i in g], mask_truncated)
             for g in chosen],
            [[str(i) for i in g] for g in chosen], pad_token_id,
        ))
        members.append([i for g in chosen for i in g])
    return batches, members
