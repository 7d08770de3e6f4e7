"""``trainer.gradient_checkpointing`` and ``trainer.logits_chunk_tokens``: a training step with checkpointing, tiled
logits or both equals the plain step (loss, every gradient), for the SFT loss and for an RL objective with an entropy
bonus; checkpointing really recomputes the layers in the backward; PolicyTrainer.join applies both keys; and ZeRO-3 on
two ranks (the head partitioned) takes the same gradient.

Tolerances (fp32): losses 1e-6 relative; gradients 1e-5 of each tensor's largest magnitude (recomputation repeats
the same ops; chunking sums the head's gradient in another order: a few ulps of the largest entries).
"""

from functools import partial

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from algorithms.aggregation import aggregate_loss
from algorithms.objective import policy_objective
from algorithms.policy_losses import clipped_surrogate
from data_pipelines.packing import IGNORE_INDEX
from tests.conftest import TEST_ARCH
from tests.train.models.test_tiled_logits import _packed
from train.models.forward import logits_chunk_tokens, per_document, token_logprobs
from train.models.model_zoo import load_model
from train.sft.loss import TokenCrossEntropy
from train.workers.policy_trainer import PolicyTrainer, enable_gradient_checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")
TRAINER = {"lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.0, "max_grad_norm": 0.0, "zero_stage": 0}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    arch = dict(TEST_ARCH)
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=384, pad_token_id=0, **arch)
    torch.manual_seed(8)
    path = tmp_path_factory.mktemp("long_sequence")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


class _RLObjective:
    """Clipped surrogate + entropy bonus on per-document rows (needs the entropy: ``needs_entropy`` is True)."""

    needs_entropy = True

    def __call__(self, logprobs, entropy, batch, extra):
        lp, mask = per_document(logprobs, batch)
        ent, _ = per_document(entropy, batch)
        old = lp.detach() + extra["shift"][: lp.shape[0], : lp.shape[1]]
        loss, _ = policy_objective(lp, old, extra["advantages"], mask, policy_loss=clipped_surrogate,
                                   aggregation=partial(aggregate_loss, mode="token-mean"), entropy=ent, entropy_coef=0.01)
        return loss, {"tokens": mask.sum()}


def _loss(kind: str):
    batch = _packed(seed=5)
    if kind == "sft":
        return TokenCrossEntropy(int((batch.labels[:, 1:] != IGNORE_INDEX).sum())), {}
    return _RLObjective(), {"advantages": torch.tensor([1.0, -0.5, 0.25, -1.0, 0.75]),
                            "shift": 0.05 * torch.randn(5, 40, generator=torch.Generator().manual_seed(1))}


def _step(model, loss_fn, extra, chunk=None):
    """(loss, gradients, calls of the first layer's attention) of one forward + backward in training mode."""
    calls = []
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
    batch = _packed(seed=5)
    logprobs, entropy = token_logprobs(model, batch, "sdpa", with_entropy=loss_fn.needs_entropy, chunk_tokens=chunk)
    loss, _ = loss_fn(logprobs, entropy, batch, extra)
    loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads, len(calls)


def _assert_same(got, want, what, loss_rel=1e-6):
    (got_loss, got_grads), (want_loss, want_grads) = got, want
    assert got_loss == pytest.approx(want_loss, rel=loss_rel), what
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 0
    for name, g in want_grads.items():
        assert g.abs().max() > 0, name
        error = (got_grads[name] - g).abs().max().item()
        assert error <= 1e-5 * g.abs().max().item(), f"{what} {name}: {error:.2e} against |max| {g.abs().max().item():.2e}"


@pytest.mark.parametrize("kind", ["sft", "rl"])
def test_checkpointing_and_tiled_logits_equal_the_plain_step(model_path, kind):
    loss_fn, extra = _loss(kind)
    plain = load_model(model_path).train()
    want_loss, want_grads, plain_calls = _step(plain, loss_fn, extra)
    checkpointed = load_model(model_path).train()
    enable_gradient_checkpointing(checkpointed)
    for chunk in (None, 7, 40):  # 7 does not divide the 2 x 40 predicting positions
        loss, grads, calls = _step(checkpointed, loss_fn, extra, chunk)
        assert (plain_calls, calls) == (1, 2)  # checkpointed: the layer runs again in the backward
        _assert_same((loss, grads), (want_loss, want_grads), f"checkpointing, chunk {chunk}")
    loss, grads, _ = _step(plain, loss_fn, extra, chunk=7)
    _assert_same((loss, grads), (want_loss, want_grads), "chunk 7 without checkpointing")


def test_policy_trainer_join_applies_both_keys(model_path):
    """One in-process rank (gloo) with both keys: its step's gradients equal the plain model's, its layers are
    recomputed, and its forwards are chunked. (One DeepSpeed world per process: this is the module's only one.)"""
    trainer = PolicyTrainer(0, 1, model_path, "sdpa", {**TRAINER, "gradient_checkpointing": True, "logits_chunk_tokens": 7},
                            micro_batches_per_rank=1, num_threads=1)
    trainer.join(*trainer.open_rendezvous())
    try:
        module = trainer.engine.module
        assert logits_chunk_tokens(trainer.engine) == 7 and module.model.gradient_checkpointing
        calls = []
        hook = module.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
        for kind in ("sft", "rl"):
            loss_fn, extra = _loss(kind)
            plain = load_model(model_path).train()
            plain.load_state_dict(trainer.full_state_dict(), strict=False)  # the weights before this step (lm_head tied)
            want_loss, want_grads, _ = _step(plain, loss_fn, extra)
            calls.clear()
            stats = trainer.train_step([_packed(seed=5)], loss_fn, [extra], keep_gradients=True)
            assert len(calls) == 2
            _assert_same((stats["loss_sum"], trainer.gradients()), (want_loss, want_grads), f"PolicyTrainer {kind}")
        hook.remove()
        plain.load_state_dict(trainer.full_state_dict(), strict=False)  # the weights after the last step
        with torch.no_grad():  # the no-grad log-prob forward (pi_old) takes the chunked path and eval mode
            torch.testing.assert_close(trainer.logprobs([_packed(seed=5)])[0],
                                       token_logprobs(plain.eval(), _packed(seed=5), "sdpa")[0], rtol=0, atol=1e-5)
    finally:
        torch.distributed.destroy_process_group()


def test_a_model_without_checkpointing_support_is_refused():
    with pytest.raises(ValueError, match="trainer.gradient_checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


@pytest.mark.slow  # two Ray actors with DeepSpeed: ~1 min on a loaded machine
def test_zero3_on_two_ranks_with_both_keys_equals_the_plain_gradient(model_path):
    """ZeRO-3 partitions the head's weight: the chunks call the head module (its gather hooks run per chunk, and again
    in the checkpoint's recomputation), and the gathered gradient still equals the plain full-logits one."""
    ray = pytest.importorskip("ray")
    from train.workers.actors import TrainerGroup
    from train.workers.ray_session import init_ray

    batches = [_packed(seed=5), _packed(seed=6)]
    loss_fn = TokenCrossEntropy(sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in batches))
    plain = load_model(model_path).train()
    total = 0.0
    for batch in batches:
        loss, _ = loss_fn(token_logprobs(plain, batch, "sdpa")[0], None, batch, {})
        loss.backward()
        total += loss.item()
    want = {n: p.grad.clone() for n, p in plain.named_parameters() if p.grad is not None}
    init_ray(num_cpus=2)
    try:
        group = TrainerGroup(2, model_path, "sdpa", {**TRAINER, "zero_stage": 3, "gradient_checkpointing": True,
                                                     "logits_chunk_tokens": 7}, micro_batches_per_rank=1)
        stats = group.train_step(batches, loss_fn, [{}, {}], keep_gradients=True)
        grads = group.gradients()
        group.shutdown()
    finally:
        ray.shutdown()
    _assert_same((sum(s["loss_sum"] for s in stats), grads), (total, want), "ZeRO-3, 2 ranks")
