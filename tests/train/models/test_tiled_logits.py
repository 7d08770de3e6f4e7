"""Tiled logits (``trainer.logits_chunk_tokens``, train/models/tiled_logits.py): per-token log-probs, entropies, the
SFT loss, an RL loss and their gradients equal the full-logits path, on packed rows of several documents and chunk
sizes that do not divide the row; the head never sees more than one chunk of tokens, in the forward or the backward.

Tolerances (fp32): log-probs and entropies 1e-5 absolute (the same per-token ops; only the matmul blocking of the
head may differ); gradients 1e-5 of each tensor's largest magnitude (the head weight's gradient is summed over chunks
in another order: a few ulps of the largest entries, as in tests/train/models/test_shared_prompt.py).
"""

import random
from functools import partial

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from algorithms.aggregation import aggregate_loss
from algorithms.objective import policy_objective
from algorithms.policy_losses import clipped_surrogate
from data_pipelines.packing import IGNORE_INDEX, Document, collate
from tests.conftest import TEST_ARCH
from train.models import forward
from train.models.forward import per_document, sft_loss_sum, token_logprobs
from train.models.model_zoo import load_model
from train.models.tiled_logits import chunked_token_logprobs
from train.rl.algorithm import PackedLoss
from train.sft.loss import TokenCrossEntropy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """The test architecture with random weights, saved and loaded as the trainer loads it (no tokenizer needed)."""
    return _saved(dict(TEST_ARCH), tmp_path_factory.mktemp("tiled"), seed=3)


def _saved(arch: dict, directory, seed: int) -> str:
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=384, pad_token_id=0, **arch)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return str(directory)


def _documents(lengths, seed=0):
    """Random documents of ``lengths``: a prompt (not trained) then a response (trained)."""
    rng = random.Random(seed)
    docs = []
    for i, n in enumerate(lengths):
        prompt = rng.randint(1, n - 1)
        docs.append(Document([rng.randrange(5, 380) for _ in range(n)], [False] * prompt + [True] * (n - prompt),
                             sample_id=f"d{i}"))
    return docs


def _packed(seed=0):
    """Two rows, five documents of different lengths, tail padding on the second row: seq 41, 40 predicting positions."""
    docs = _documents([17, 9, 15, 23, 11], seed)
    return collate([[docs[0], docs[1], docs[2]], [docs[3], docs[4]]], pad_token_id=0)


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_grads_close(got: dict, want: dict):
    assert got.keys() == want.keys() and len(want) > 0
    for name, g in want.items():
        assert g.abs().max() > 0, name
        error = (got[name] - g).abs().max().item()
        assert error <= 1e-5 * g.abs().max().item(), f"{name}: {error:.2e} against |max| {g.abs().max().item():.2e}"


@pytest.mark.parametrize("chunk", [1, 7, 16, 40, 1000])
def test_chunked_logprobs_and_entropy_equal_float64_golden(chunk):
    """Against log_softmax of W h computed in float64 (independent of both paths); 7 and 16 do not divide 2 x 20."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 20, 8, generator=gen)
    head = torch.nn.Linear(8, 50, bias=True)
    targets = torch.randint(0, 50, (2, 20), generator=gen)
    logits64 = (hidden.double() @ head.weight.double().T + head.bias.double()) / 0.7
    lp64 = torch.log_softmax(logits64, -1)
    want_lp = lp64.gather(-1, targets[..., None])[..., 0]
    want_ent = -(lp64.exp() * lp64).sum(-1)
    lp, ent = chunked_token_logprobs(hidden, head, targets, chunk, temperature=0.7, with_entropy=True)
    assert lp.shape == ent.shape == (2, 20) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), want_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), want_ent, rtol=0, atol=1e-5)
    # gradients of a loss mixing both outputs, against float64 autograd on the full logits
    h = hidden.clone().requires_grad_(True)
    weights = torch.randn(2, 20, generator=gen)
    lp, ent = chunked_token_logprobs(h, head, targets, chunk, temperature=0.7, with_entropy=True)
    ((lp * weights).sum() + 0.3 * ent.sum()).backward()
    h64 = hidden.double().requires_grad_(True)
    w64, b64 = head.weight.double().detach().requires_grad_(True), head.bias.double().detach().requires_grad_(True)
    lp64 = torch.log_softmax((h64 @ w64.T + b64) / 0.7, -1)
    loss64 = (lp64.gather(-1, targets[..., None])[..., 0] * weights.double()).sum() + 0.3 * (-(lp64.exp() * lp64).sum(-1)).sum()
    loss64.backward()
    for got, want in ((h.grad, h64.grad), (head.weight.grad, w64.grad), (head.bias.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [5, 13, 64])
def test_sft_loss_and_gradients_equal_the_full_logits(model_path, chunk):
    """The SFT loss as the trainer computes it (token_logprobs -> TokenCrossEntropy) and ``sft_loss_sum``."""
    model = load_model(model_path)
    batch = _packed()
    loss_fn = TokenCrossEntropy(step_loss_tokens=100)
    full_loss, _ = loss_fn(token_logprobs(model, batch, "sdpa")[0], None, batch, {})
    full_loss.backward()
    want = _grads(model)
    forward.set_logits_chunk_tokens(model, chunk)  # as PolicyTrainer.join does
    chunk_loss, stats = loss_fn(token_logprobs(model, batch, "sdpa")[0], None, batch, {})
    chunk_loss.backward()
    got = _grads(model)
    torch.testing.assert_close(chunk_loss, full_loss, rtol=1e-6, atol=1e-6)
    assert int(stats["loss_tokens"]) == int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    _assert_grads_close(got, want)
    # sft_loss_sum (cross_entropy on the full logits vs the chunked log-probs)
    forward.set_logits_chunk_tokens(model, None)
    full_sum, n_full = sft_loss_sum(model, batch, "sdpa")
    chunk_sum, n_chunk = sft_loss_sum(model, batch, "sdpa", chunk_tokens=chunk)
    assert n_full == n_chunk > 0
    torch.testing.assert_close(chunk_sum, full_sum, rtol=1e-6, atol=1e-5)


def _rl_loss(logprobs, entropy, batch, ref, old, advantages, entropy_coef):
    """The RL loss of a trainer rank (train/rl/algorithm.py PackedLoss): GRPO-style clipped surrogate + k3 KL (+ an
    entropy bonus), token-mean. Without the bonus PackedLoss detaches the entropy in place."""
    objective = partial(policy_objective, policy_loss=partial(clipped_surrogate, eps_low=0.2, eps_high=0.28),
                        aggregation=partial(aggregate_loss, mode="token-mean"), kl_beta=0.05, entropy_coef=entropy_coef)
    loss_fn = PackedLoss(objective, normalizer=60.0, entropy_bonus=entropy_coef > 0)
    return loss_fn(logprobs, entropy, batch, {"advantages": advantages, "old_logprobs": old, "ref_logprobs": ref})[0]


@pytest.mark.parametrize("chunk, entropy_coef", [(6, 0.01), (29, 0.01), (6, 0.0)])
def test_rl_logprobs_entropy_loss_and_gradients_equal_the_full_logits(model_path, chunk, entropy_coef):
    model = load_model(model_path)
    batch = _packed(seed=1)
    with torch.no_grad():
        full_lp, _ = token_logprobs(model, batch, "sdpa")
        old = per_document(full_lp + 0.05 * torch.randn(full_lp.shape, generator=torch.Generator().manual_seed(2)), batch)[0]
        ref = per_document(full_lp - 0.1, batch)[0]
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.75])
    lp, ent = token_logprobs(model, batch, "sdpa", temperature=0.9, with_entropy=True)
    full = _rl_loss(lp, ent, batch, ref, old, advantages, entropy_coef)
    full.backward()
    want = _grads(model)
    lp_c, ent_c = token_logprobs(model, batch, "sdpa", temperature=0.9, with_entropy=True, chunk_tokens=chunk)
    chunked = _rl_loss(lp_c, ent_c, batch, ref, old, advantages, entropy_coef)
    chunked.backward()
    got = _grads(model)
    torch.testing.assert_close(lp_c, lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_c, ent, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    _assert_grads_close(got, want)
    # the no-grad forward (pi_old, reference) takes the chunked path too
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(model, batch, "sdpa", chunk_tokens=chunk)[0], full_lp, rtol=0, atol=1e-5)


def test_the_head_never_sees_more_than_one_chunk(model_path):
    """Forward and backward (the checkpoint's recomputation) call the output head on <= chunk tokens at a time."""
    model = load_model(model_path)
    batch = _packed()
    tokens_seen = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: tokens_seen.append(out.shape[:-1].numel()))
    lp, ent = token_logprobs(model, batch, "sdpa", with_entropy=True, chunk_tokens=12)
    forward_calls = len(tokens_seen)
    (lp.sum() + ent.sum()).backward()
    hook.remove()
    total = batch.input_ids.shape[0] * (batch.input_ids.shape[1] - 1)  # 80 predicting positions
    assert forward_calls == -(-total // 12) == 7  # 6 chunks of 12 and one of 8
    assert len(tokens_seen) == 2 * forward_calls  # each chunk recomputed once in the backward
    assert max(tokens_seen) == 12 and sum(tokens_seen[:forward_calls]) == total


def test_shared_prompt_batches_chunked_equal_full(model_path):
    from data_pipelines.shared_prompt import shared_prompt_batches
    from train.workers.rollout_worker import Rollout

    rng = random.Random(4)
    rollouts = []
    for p in range(3):
        prompt = [rng.randrange(5, 300) for _ in range(rng.randint(4, 9))]
        rollouts += [Rollout(p, prompt, [rng.randrange(5, 300) for _ in range(rng.randint(2, 8))], "", False, 0)
                     for _ in range(3)]
    (batch,), _ = shared_prompt_batches(rollouts, 1, 0, False)
    model = load_model(model_path)
    lp, ent = token_logprobs(model, batch, "sdpa", with_entropy=True)
    (lp.sum() + ent.sum()).backward()
    want = _grads(model)
    lp_c, ent_c = token_logprobs(model, batch, "sdpa", with_entropy=True, chunk_tokens=5)
    (lp_c.sum() + ent_c.sum()).backward()
    torch.testing.assert_close(lp_c, lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_c, ent, rtol=0, atol=1e-5)
    _assert_grads_close(_grads(model), want)


def test_mamba2_chunked_equals_full(tmp_path):
    """The attention-free path (CPU fallback: one document per padded row, hidden states put back in the rows)."""
    from tests.train.models.test_mamba2 import MAMBA_TEST_ARCH

    model = load_model(_saved(dict(MAMBA_TEST_ARCH), tmp_path, seed=1))
    batch = _packed(seed=2)
    lp, ent = token_logprobs(model, batch, "sdpa", with_entropy=True)
    lp.sum().backward()
    want = _grads(model)
    lp_c, ent_c = token_logprobs(model, batch, "sdpa", with_entropy=True, chunk_tokens=9)
    lp_c.sum().backward()
    torch.testing.assert_close(lp_c, lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_c, ent, rtol=0, atol=1e-5)
    _assert_grads_close(_grads(model), want)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_bad_chunk_size_is_refused(model_path, bad):
    with pytest.raises(ValueError, match="trainer.logits_chunk_tokens"):
        forward.set_logits_chunk_tokens(load_model(model_path), bad)
