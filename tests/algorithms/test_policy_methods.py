"""Issue 22's methods against float64 references computed element by element from the papers' formulas (no tensor
code shared with algorithms/): GSPO, CISPO, Clip-Cov, KL-Cov, REINFORCE++, ReMax, GPG, pass@k, k3+, the entropy
bonus and the rollout/trainer mismatch correction."""

import itertools
import math
from functools import partial

import pytest
import torch

from algorithms.advantages import (
    gpg_advantages,
    passk_advantages,
    reinforce_pp_advantages,
    remax_advantages,
)
from algorithms.aggregation import aggregate_loss
from algorithms.kl import kl_estimate
from algorithms.mismatch import rollout_correction
from algorithms.objective import policy_objective
from algorithms.policy_losses import (
    advantage_weighted_ce,
    cispo,
    clip_cov,
    gspo,
    kl_cov,
)

torch.manual_seed(3)
B, T = 4, 5
LOGP = torch.randn(B, T, dtype=torch.float64) * 0.3 - 1.0
OLD = LOGP + torch.randn(B, T, dtype=torch.float64) * 0.05  # sequence ratios near 1: some inside, some outside GSPO's range
ADV = torch.tensor([1.5, -0.7, 0.4, -2.0], dtype=torch.float64)
LENGTHS = [5, 3, 1, 4]
MASK = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in LENGTHS], dtype=torch.float64)


def grad_of(policy_loss, mode="token-mean", adv=ADV, **kw):
    logp = LOGP.clone().requires_grad_(True)
    loss, metrics = policy_objective(logp, OLD, adv, MASK, policy_loss=policy_loss,
                                     aggregation=partial(aggregate_loss, mode=mode), **kw)
    loss.backward()
    return loss.item(), logp.grad, metrics


def test_gspo_sequence_ratio_clipped_per_sequence():
    eps_low, eps_high = 0.01, 0.015
    loss_ref, grad_ref = 0.0, torch.zeros(B, T, dtype=torch.float64)
    for i, n in enumerate(LENGTHS):
        s = math.exp(sum(LOGP[i, t].item() - OLD[i, t].item() for t in range(n)) / n)
        a = ADV[i].item()
        clipped = min(max(s, 1 - eps_low), 1 + eps_high)
        loss_ref += -min(s * a, clipped * a) / B  # seq-mean-token-mean: every token of i has the same value
        if s * a <= clipped * a:  # the unclipped term is active: d(-s a)/d logp_it = -a s / n
            for t in range(n):
                grad_ref[i, t] = -a * s / n / B
    loss, grad, _ = grad_of(partial(gspo, eps_low=eps_low, eps_high=eps_high), "seq-mean-token-mean")
    assert loss == pytest.approx(loss_ref, abs=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-12)
    assert 0 < grad.abs().sum() and (grad == 0).all(dim=1).any()  # some sequences clipped whole, some not


def test_gspo_token_with_token_advantages():
    adv = torch.randn(B, T, dtype=torch.float64)
    _, grad, _ = grad_of(partial(gspo, eps_low=10.0, eps_high=10.0), "token-mean", adv=adv)  # no clipping
    n_tokens = sum(LENGTHS)
    for i, n in enumerate(LENGTHS):  # s_it = sg[s_i] pi_it / sg[pi_it]: d/dlogp_it = s_i, each token its own A_it
        s = math.exp(sum(LOGP[i, t].item() - OLD[i, t].item() for t in range(n)) / n)
        for t in range(n):
            assert grad[i, t].item() == pytest.approx(-adv[i, t].item() * s / n_tokens, abs=1e-12)


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    old = LOGP - 0.3 * torch.arange(T, dtype=torch.float64)  # ratios e^{0.3 t}: tokens beyond 1 + eps_high
    logp = LOGP.clone().requires_grad_(True)
    per_token, metrics = cispo(logp, old, ADV, MASK, eps_low=1.0, eps_high=0.28)
    (per_token * MASK).sum().backward()
    for i in range(B):
        for t in range(T):
            w = min(max(math.exp(LOGP[i, t].item() - old[i, t].item()), 0.0), 1.28)
            assert per_token[i, t].item() == pytest.approx(-w * ADV[i].item() * LOGP[i, t].item(), abs=1e-12)
            assert logp.grad[i, t].item() == pytest.approx(-w * ADV[i].item() * MASK[i, t].item(), abs=1e-12)
    assert metrics["clip_frac"].item() == pytest.approx(sum(max(0, n - 1) for n in LENGTHS) / sum(LENGTHS))


def _cov_reference():
    tokens = [(i, t) for i in range(B) for t in range(T) if MASK[i, t]]
    mean_a = sum(ADV[i].item() for i, _ in tokens) / len(tokens)
    mean_l = sum(LOGP[i, t].item() for i, t in tokens) / len(tokens)
    return tokens, {(i, t): (ADV[i].item() - mean_a) * (LOGP[i, t].item() - mean_l) for i, t in tokens}


def test_clip_cov_detaches_the_tokens_in_the_covariance_window():
    tokens, cov = _cov_reference()
    lb, ub = sorted(cov.values())[len(cov) // 2], 5.0  # the upper half of the covariances
    # clip_ratio 1: every candidate is picked, so the random draw does not matter
    _, grad, metrics = grad_of(partial(clip_cov, eps_low=10.0, eps_high=10.0, clip_ratio=1.0, cov_lb=lb, cov_ub=ub))
    picked = {k for k, c in cov.items() if lb < c < ub}
    assert 0 < len(picked) < len(tokens)
    for i, t in tokens:
        ratio = math.exp(LOGP[i, t].item() - OLD[i, t].item())
        expected = 0.0 if (i, t) in picked else -ADV[i].item() * ratio / len(tokens)
        assert grad[i, t].item() == pytest.approx(expected, abs=1e-12)
    assert metrics["cov_clip_frac"].item() == pytest.approx(len(picked) / len(tokens))


def test_kl_cov_penalises_the_top_covariance_tokens():
    tokens, cov = _cov_reference()
    ratio_k = 0.3
    count = max(1, int(len(tokens) * ratio_k))
    top = set(sorted(cov, key=cov.get, reverse=True)[:count])
    loss, _, _ = grad_of(partial(kl_cov, kl_ratio=ratio_k, kl_coef=0.5))
    expected = 0.0
    for i, t in tokens:
        log_r = LOGP[i, t].item() - OLD[i, t].item()
        expected += -math.exp(log_r) * ADV[i].item() + (0.5 * abs(log_r) if (i, t) in top else 0.0)
    assert loss == pytest.approx(expected / len(tokens), abs=1e-12)


REWARDS = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, 0.0, 1.0, 1.0], dtype=torch.float64)  # G = 3, middle group equal


@pytest.mark.parametrize("baseline, whiten", [("group", "tokens"), ("group", "responses"), ("none", "responses")])
def test_reinforce_pp_whitens_over_the_batch(baseline, whiten):
    lengths = torch.tensor([3, 1, 4, 2, 2, 5, 1, 1, 6], dtype=torch.float64)
    r = REWARDS.tolist()
    centred = [r[i] - (sum(r[i // 3 * 3: i // 3 * 3 + 3]) / 3 if baseline == "group" else 0.0) for i in range(9)]
    w = lengths.tolist() if whiten == "tokens" else [1.0] * 9
    mean = sum(c * x for c, x in zip(centred, w)) / sum(w)
    var = sum(x * (c - mean) ** 2 for c, x in zip(centred, w)) / (sum(w) - 1)
    expected = [(c - mean) / math.sqrt(var + 1e-8) for c in centred]
    got = reinforce_pp_advantages(REWARDS, 3, baseline=baseline, whiten=whiten, response_lengths=lengths)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_remax_subtracts_the_greedy_reward_and_allows_one_sample_per_prompt():
    greedy = torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64)
    assert remax_advantages(REWARDS[:3], 1, greedy).tolist() == [0.5, -1.0, 0.5]
    with pytest.raises(ValueError, match="greedy_rollout"):
        remax_advantages(REWARDS[:3], 1, None)


@pytest.mark.parametrize("alpha, factor", [("valid", 9 / 6), ("nonzero", 9 / 7), ("none", 1.0)])
def test_gpg_correction_factor(alpha, factor):
    r = REWARDS.tolist()
    expected = [factor * (r[i] - sum(r[i // 3 * 3: i // 3 * 3 + 3]) / 3) for i in range(9)]
    assert gpg_advantages(REWARDS, 3, alpha=alpha).tolist() == pytest.approx(expected, abs=1e-12)


def test_gpg_loss_is_the_plain_policy_gradient():
    _, grad, _ = grad_of(advantage_weighted_ce)
    expected = -ADV[:, None].expand(B, T) * MASK / sum(LENGTHS)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


def _passk_bruteforce(success: list[int], k: int) -> list[float]:
    """Every k-subset of the group rewarded by max over its members, normalised by the subsets' mean and (biased)
    std; a response's advantage is the mean over the subsets that contain it (the paper's bootstrap, exhaustively)."""
    n = len(success)
    subsets = list(itertools.combinations(range(n), k))
    values = [max(success[j] for j in s) for s in subsets]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    if std == 0:
        return [0.0] * n
    return [sum((v - mean) / std for s, v in zip(subsets, values) if i in s) / sum(1 for s in subsets if i in s)
            for i in range(n)]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_passk_closed_form_equals_enumerating_all_subsets(k):
    groups = [[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 1]]
    rewards = torch.tensor([float(v) for g in groups for v in g], dtype=torch.float64)
    expected = [a for g in groups for a in _passk_bruteforce(g, k)]
    assert passk_advantages(rewards, 6, k=k).tolist() == pytest.approx(expected, abs=1e-12)


def test_passk_k1_is_grpo_with_the_biased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    grouped = rewards.view(2, 4)
    expected = (grouped - grouped.mean(1, keepdim=True)) / grouped.std(1, unbiased=False, keepdim=True)
    assert passk_advantages(rewards, 4, k=1).tolist() == pytest.approx(expected.flatten().tolist(), abs=1e-12)


@pytest.mark.parametrize("estimator, value", [("k3+", lambda d: math.exp(-d) + d - 1), ("k1+", lambda d: d)])
def test_straight_through_kl_value_of_k1_k3_gradient_of_k2(estimator, value):
    logp = LOGP.clone().requires_grad_(True)
    kl = kl_estimate(logp, OLD, estimator)
    kl.sum().backward()
    for i in range(B):
        for t in range(T):
            d = LOGP[i, t].item() - OLD[i, t].item()
            assert kl[i, t].item() == pytest.approx(value(d), abs=1e-12)
            assert logp.grad[i, t].item() == pytest.approx(d, abs=1e-12)  # d/dlogp of 0.5 d^2


def test_entropy_bonus_lowers_the_loss_by_coef_times_mean_entropy():
    entropy = (torch.rand(B, T, dtype=torch.float64) * 2).requires_grad_(True)
    base, _, _ = grad_of(advantage_weighted_ce)
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = policy_objective(logp, OLD, ADV, MASK, policy_loss=advantage_weighted_ce,
                               aggregation=partial(aggregate_loss, mode="token-mean"), entropy=entropy, entropy_coef=0.05)
    loss.backward()
    mean_h = sum(entropy[i, t].item() for i in range(B) for t in range(LENGTHS[i])) / sum(LENGTHS)
    assert loss.item() == pytest.approx(base - 0.05 * mean_h, abs=1e-12)
    torch.testing.assert_close(entropy.grad, -0.05 * MASK / sum(LENGTHS), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["tis", "mask"])
def test_mismatch_weights_and_metrics(mode):
    rollout = OLD + torch.linspace(-1.2, 1.2, B * T, dtype=torch.float64).view(B, T)  # some tokens far off
    weights, metrics = rollout_correction(OLD, rollout, MASK, mode=mode, threshold=1.5)
    tokens = [(i, t) for i in range(B) for t in range(LENGTHS[i])]
    outside, kl = 0, 0.0
    for i in range(B):
        for t in range(T):
            log_w = OLD[i, t].item() - rollout[i, t].item()
            w = math.exp(log_w)
            far = w > 1.5 if mode == "tis" else (w > 1.5 or w < 1 / 1.5)
            expected = (min(w, 1.5) if mode == "tis" else float(not far)) * MASK[i, t].item()
            assert weights[i, t].item() == pytest.approx(expected, abs=1e-12)
            if MASK[i, t]:
                outside += far
                kl += w - 1 - log_w
    assert metrics["mismatch_weight_clip_frac"].item() == pytest.approx(outside / len(tokens))
    assert metrics["mismatch_kl"].item() == pytest.approx(kl / len(tokens), abs=1e-12)
    assert 0 < outside < len(tokens)


def test_mismatch_in_the_objective_scales_each_token_and_refuses_without_rollout_logprobs():
    rollout = OLD - 0.2
    corrected = partial(rollout_correction, mode="tis", threshold=2.0)
    _, grad, metrics = grad_of(advantage_weighted_ce, mismatch=corrected, rollout_logprobs=rollout)
    _, plain, _ = grad_of(advantage_weighted_ce)
    torch.testing.assert_close(grad, plain * math.exp(0.2), rtol=0, atol=1e-12)
    assert "mismatch_kl" in metrics
    with pytest.raises(ValueError, match="mismatch=null"):
        grad_of(advantage_weighted_ce, mismatch=corrected)
