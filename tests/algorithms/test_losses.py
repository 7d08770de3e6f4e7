"""Policy losses, KL estimators and aggregation against float64 references computed element by element."""

import math
from functools import partial

import pytest
import torch

from algorithms.aggregation import aggregate_loss
from algorithms.kl import kl_estimate, kl_reward_penalty
from algorithms.objective import policy_objective
from algorithms.policy_losses import advantage_weighted_ce, clipped_surrogate

torch.manual_seed(0)
B, T = 4, 5
LOGP = (torch.randn(B, T, dtype=torch.float64) * 0.3 - 1.0)
OLD = LOGP + torch.randn(B, T, dtype=torch.float64) * 0.4  # ratios well outside [0.8, 1.2] for some tokens
REF = LOGP + torch.randn(B, T, dtype=torch.float64) * 0.2
ADV = torch.tensor([1.5, -0.7, 0.0, -2.0], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float64)


def ref_surrogate(eps_low, eps_high, dual=None):
    out = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            r = math.exp(LOGP[i, t].item() - OLD[i, t].item())
            a = ADV[i].item()
            obj = min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
            if dual is not None and a < 0:
                obj = max(obj, dual * a)
            out[i][t] = -obj
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("eps_low,eps_high,dual", [(0.2, 0.2, None), (0.2, 0.28, None), (0.2, 0.28, 3.0)])
def test_clipped_surrogate_reference(eps_low, eps_high, dual):
    got, metrics = clipped_surrogate(LOGP, OLD, ADV, MASK, eps_low=eps_low, eps_high=eps_high, dual_clip=dual)
    torch.testing.assert_close(got, ref_surrogate(eps_low, eps_high, dual), rtol=0, atol=1e-12)
    assert 0.0 <= float(metrics["clip_frac_high"]) <= 1.0


def test_dual_clip_bounds_negative_advantage_loss():
    logp = torch.tensor([[2.0]], dtype=torch.float64)  # ratio e^2 = 7.39 on a bad token
    got, _ = clipped_surrogate(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64),
                               torch.ones(1, 1), dual_clip=3.0)
    assert got.item() == pytest.approx(3.0)


def test_dual_clip_must_exceed_clip_range():
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_surrogate(LOGP, OLD, ADV, MASK, dual_clip=1.1)


def test_single_token_response():
    logp = torch.tensor([[-0.5]], dtype=torch.float64, requires_grad=True)
    loss, _ = clipped_surrogate(logp, torch.tensor([[-0.5]], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64), torch.ones(1, 1))
    for mode in ("token-mean", "seq-mean-token-mean"):
        value = aggregate_loss(loss, torch.ones(1, 1, dtype=torch.float64), mode=mode)
        assert value.item() == pytest.approx(-2.0)  # ratio 1: -A
    value.backward()
    assert logp.grad.item() == pytest.approx(-2.0)  # d(-r A)/d logp = -r A


def test_kl_estimators_reference():
    for name in ("k1", "k2", "k3"):
        got = kl_estimate(LOGP, REF, name)
        for i in range(B):
            for t in range(T):
                lr = LOGP[i, t].item() - REF[i, t].item()  # log pi/pi_ref
                expected = {"k1": lr, "k2": 0.5 * lr * lr, "k3": math.exp(-lr) + lr - 1}[name]
                assert got[i, t].item() == pytest.approx(expected, abs=1e-12)
    assert (kl_estimate(LOGP, REF, "k3") >= 0).all()
    with pytest.raises(ValueError, match=r"algorithm\.kl\.estimator"):
        kl_estimate(LOGP, REF, "k4")


def test_kl_reward_penalty_reference():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    got = kl_reward_penalty(rewards, LOGP, REF, MASK, beta=0.1, estimator="k1")
    expected = [rewards[i].item() - 0.1 * sum((LOGP[i, t] - REF[i, t]).item() for t in range(T) if MASK[i, t]) for i in range(B)]
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def ref_aggregate(x, mode, max_len=None):
    rows = [[x[i, t].item() for t in range(T) if MASK[i, t]] for i in range(B)]
    if mode == "token-mean":
        flat = [v for row in rows for v in row]
        return sum(flat) / len(flat)
    if mode == "seq-mean-token-mean":
        return sum(sum(row) / len(row) if row else 0.0 for row in rows) / B
    return sum(sum(row) for row in rows) / (B * max_len)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregation_reference_with_fully_masked_row(mode):
    x = torch.randn(B, T, dtype=torch.float64)
    got = aggregate_loss(x, MASK, mode=mode, max_response_len=16)
    assert got.item() == pytest.approx(ref_aggregate(x, mode, 16), abs=1e-12)
    assert torch.isfinite(got)


def test_aggregation_all_masked_is_zero_not_nan():
    for mode in ("token-mean", "seq-mean-token-mean"):
        assert aggregate_loss(torch.randn(2, 3), torch.zeros(2, 3), mode=mode).item() == 0.0


def test_aggregation_normalizer_splits_micro_batches_exactly():
    x = torch.randn(B, T, dtype=torch.float64)
    full = aggregate_loss(x, MASK, mode="token-mean")
    parts = sum(aggregate_loss(x[i : i + 2], MASK[i : i + 2], mode="token-mean", normalizer=MASK.sum()) for i in (0, 2))
    assert parts.item() == pytest.approx(full.item(), abs=1e-12)


def test_aggregation_errors_name_the_key():
    with pytest.raises(ValueError, match=r"algorithm\.aggregation\.mode"):
        aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), mode="sum")
    with pytest.raises(ValueError, match=r"max_response_len"):
        aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), mode="seq-mean-token-sum-norm")


def test_aapo_ce_gradient_is_minus_advantage_times_grad_logp():
    torch.manual_seed(1)
    logits = torch.randn(B, T, 7, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 7, (B, T))
    logp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    per_token, _ = advantage_weighted_ce(logp, None, ADV, MASK)
    loss = aggregate_loss(per_token, MASK, mode="token-mean")
    (grad,) = torch.autograd.grad(loss, logits)
    # independent: sum_{i,t in mask} -A_i * grad log pi(o_it) / num_tokens, with grad log softmax = onehot - p
    probs = torch.softmax(logits.detach(), -1)
    expected = torch.zeros_like(probs)
    n = MASK.sum().item()
    for i in range(B):
        for t in range(T):
            if MASK[i, t]:
                onehot = torch.zeros(7, dtype=torch.float64)
                onehot[tokens[i, t]] = 1.0
                expected[i, t] = -ADV[i].item() * (onehot - probs[i, t]) / n
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


def test_objective_adds_kl_per_token_before_aggregation():
    policy = partial(clipped_surrogate, eps_low=0.2, eps_high=0.2)
    agg = partial(aggregate_loss, mode="seq-mean-token-mean")
    loss, metrics = policy_objective(LOGP, OLD, ADV, MASK, policy_loss=policy, aggregation=agg, ref_logprobs=REF, kl_beta=0.05)
    per_token = ref_surrogate(0.2, 0.2) + 0.05 * kl_estimate(LOGP, REF, "k3")
    assert loss.item() == pytest.approx(ref_aggregate(per_token, "seq-mean-token-mean"), abs=1e-12)
    assert "kl" in metrics
    reward_placed, _ = policy_objective(LOGP, OLD, ADV, MASK, policy_loss=policy, aggregation=agg, ref_logprobs=REF,
                                        kl_beta=0.05, kl_placement="reward")
    assert reward_placed.item() == pytest.approx(ref_aggregate(ref_surrogate(0.2, 0.2), "seq-mean-token-mean"), abs=1e-12)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_objective(LOGP, OLD, ADV, MASK, policy_loss=policy, aggregation=agg, kl_beta=0.05)
