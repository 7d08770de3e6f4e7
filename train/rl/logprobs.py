"""Log-probs recorded before the update, per optimizer step and micro-batch, as [docs, response_len] tensors:
pi_old (when the algorithm needs its own forward: train/rl/algorithm.py) and the reference model's (KL)."""

from __future__ import annotations

from typing import NamedTuple

from train.models.forward import per_document


class StepLogprobs(NamedTuple):
    """``old[k][j]``, ``masks[k][j]``, ``ref[k][j]``: update k, micro-batch j (None where not recorded)."""

    old: list
    masks: list
    ref: list


def record_logprobs(trainer, reference, updates, need_old: bool, timer) -> StepLogprobs:
    from train.workers.actors import wait_all

    old = [[None] * len(u.micro) for u in updates]
    masks = [[None] * len(u.micro) for u in updates]
    ref = [[None] * len(u.micro) for u in updates]
    if need_old:
        with timer("old_logprobs"):
            for k, u in enumerate(updates):
                old[k], masks[k] = zip(*[per_document(lp, b) for lp, b in zip(trainer.logprobs(u.micro), u.micro)])
    if reference is not None:
        with timer("reference"):
            for k, u in enumerate(updates):
                # within cluster.actor_timeout_s, as every wait on an actor (the trainer group's limit)
                reference_lps = wait_all([reference.logprobs.remote(u.micro)], ["the KL reference model"],
                                         "reference log-probs", getattr(trainer, "timeout_s", None))[0]
                ref[k] = [per_document(lp, b)[0] for lp, b in zip(reference_lps, u.micro)]
    return StepLogprobs(old, masks, ref)
