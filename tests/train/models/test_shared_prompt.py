"""Shared-prompt micro-batches (data_pipelines/shared_prompt.py): the prompt runs once per group, and the
per-response log-probs, entropies and gradients equal those of the packed layout (one document per response)."""

import random

import pytest
import torch
from omegaconf import OmegaConf

from data_pipelines.packing import pack_balanced
from data_pipelines.shared_prompt import shared_prompt_batches, split_groups
from tests.conftest import TEST_ARCH
from train.models.forward import per_document, token_logprobs
from train.rl.update_batches import rollouts_to_documents
from train.workers.rollout_worker import Rollout


def _rollouts(group_sizes, seed=0):
    rng = random.Random(seed)
    rollouts = []
    for p, g in enumerate(group_sizes):
        prompt = [rng.randrange(5, 300) for _ in range(rng.randint(3, 11))]
        for _ in range(g):
            n = rng.randint(1, 9)
            rollouts.append(Rollout(p, prompt, [rng.randrange(5, 300) for _ in range(n)], "", rng.random() < 0.3, 0))
    return rollouts


@pytest.fixture
def model(model_cache, one_thread):
    from train.models.model_zoo import load_model, resolve_model_path

    cfg = OmegaConf.create({"path": None, "cache_dir": str(model_cache), "tiny": {"vocab_size": 384, "seed": 0, "arch": dict(TEST_ARCH)}})
    return load_model(str(resolve_model_path(cfg)), "sdpa", torch.float32, torch.device("cpu"))


def _per_response(model, batches, members, n):
    """log-probs [n, width], entropies and mask, in rollout order, and the gradient of sum(logprobs * w)."""
    model.zero_grad()
    weights = torch.linspace(-1.0, 1.0, n)
    rows = [None] * n
    total = 0.0
    for batch, idx in zip(batches, members):
        lp, ent = token_logprobs(model, batch, "sdpa", with_entropy=True)
        lp_doc, mask = per_document(lp, batch)
        ent_doc, _ = per_document(ent, batch)
        total = total + (lp_doc * mask * weights[idx][:, None]).sum()
        for k, i in enumerate(idx):
            rows[i] = (lp_doc[k][mask[k]].detach(), ent_doc[k][mask[k]])
    total.backward()
    return rows, {n_: p.grad.clone() for n_, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_shared_prompt_logprobs_and_gradients_equal_the_packed_layout(model, mask_truncated):
    rollouts = _rollouts([4, 4, 3, 4, 2])
    documents = rollouts_to_documents(rollouts, mask_truncated)
    packed, packed_members = pack_balanced(documents, 2, 64, 0)
    shared, shared_members = shared_prompt_batches(rollouts, 2, 0, mask_truncated)
    assert sorted(i for m in shared_members for i in m) == list(range(len(rollouts)))
    # each prompt appears once per batch, each response once
    assert sum(b.prompt_ids.shape[0] for b in shared) == 5 and sum(b.response_ids.shape[0] for b in shared) == len(rollouts)
    expected, grads_expected = _per_response(model, packed, packed_members, len(rollouts))
    got, grads_got = _per_response(model, shared, shared_members, len(rollouts))
    for i, ((lp_e, ent_e), (lp_g, ent_g)) in enumerate(zip(expected, got)):
        torch.testing.assert_close(lp_g, lp_e, rtol=1e-5, atol=1e-5, msg=f"log-probs of rollout {i}")
        torch.testing.assert_close(ent_g, ent_e, rtol=1e-5, atol=1e-5, msg=f"entropy of rollout {i}")
        if mask_truncated and rollouts[i].truncated:
            assert len(lp_g) == 0
    assert grads_got.keys() == grads_expected.keys()
    # the same fp32 sums in another order: the error is a few ulps of each tensor's largest entries (measured
    # 5e-7 of it), so the bound is relative to the tensor's largest magnitude; an elementwise bound used half its
    # margin on near-zero entries and depends on the CPU's vector width
    for name, want in grads_expected.items():
        error = (grads_got[name] - want).abs().max().item()
        assert error <= 1e-5 * want.abs().max().item(), f"{name}: {error:.2e} against |max| {want.abs().max().item():.2e}"


def test_groups_split_whole_and_balanced():
    assert split_groups([10, 10, 10, 40], 2) == [[3], [0, 1, 2]]
    assert split_groups([5, 7, 9], 3) == [[2], [1], [0]]
    with pytest.raises(ValueError, match="prompt groups cannot fill 3 micro-batches"):
        split_groups([5, 7], 3)
