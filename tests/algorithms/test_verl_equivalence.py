"""Our new methods equal verl's core_algos (0.9.1) on identical float64 tensors: values and gradients. verl's numbers
are stored in verl_golden.json, generated once by tests/algorithms/verl_golden.py (verl pins versions of transformers
and tensordict that this repo's pins exclude, so it is not a test dependency)."""

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from algorithms import advantages as adv
from algorithms import mismatch
from algorithms import policy_losses as pl
from algorithms.aggregation import aggregate_loss
from algorithms.kl import kl_estimate
from algorithms.objective import policy_objective

GOLDEN = json.loads(Path(__file__).with_name("verl_golden.json").read_text())
X = {k: torch.tensor(v, dtype=torch.float64) for k, v in GOLDEN["inputs"].items()}
G = GOLDEN["G"]


def ours(policy_loss, mode="token-mean"):
    logp = X["logp"].clone().requires_grad_(True)
    loss, _ = policy_objective(logp, X["old"], X["adv"], X["mask"], policy_loss=policy_loss,
                               aggregation=partial(aggregate_loss, mode=mode))
    loss.backward()
    return loss.item(), logp.grad


# verl's seq-mean-token-mean divides by (tokens + 1e-8), ours by max(tokens, 1): 1e-9 apart on these lengths
@pytest.mark.parametrize("name, policy_loss, mode, atol", [
    ("gspo", partial(pl.gspo, eps_low=0.05, eps_high=0.08), "seq-mean-token-mean", 1e-8),
    ("cispo", partial(pl.cispo, eps_low=1.0, eps_high=0.28), "token-mean", 1e-12),
    ("gpg_loss", pl.advantage_weighted_ce, "token-mean", 1e-12),
    ("kl_cov", partial(pl.kl_cov, kl_ratio=0.2, kl_coef=1.0), "token-mean", 1e-12),
])
def test_policy_loss_equals_verl(name, policy_loss, mode, atol):
    loss, grad = ours(policy_loss, mode)
    assert loss == pytest.approx(GOLDEN[name]["loss"], abs=atol)
    torch.testing.assert_close(grad, torch.tensor(GOLDEN[name]["grad"], dtype=torch.float64), rtol=0, atol=atol)


def test_clip_cov_equals_verl_with_the_same_random_draw():
    torch.manual_seed(GOLDEN["clip_cov_seed"])
    loss, grad = ours(partial(pl.clip_cov, eps_low=0.2, eps_high=0.2, clip_ratio=0.1, cov_lb=0.0, cov_ub=5.0))
    assert loss == pytest.approx(GOLDEN["clip_cov"]["loss"], abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor(GOLDEN["clip_cov"]["grad"], dtype=torch.float64), rtol=0, atol=1e-12)


def test_advantages_equal_verl():
    lengths = X["mask"].sum(1)
    torch.testing.assert_close(adv.reinforce_pp_advantages(X["rewards"], G, baseline="group", response_lengths=lengths),
                               torch.tensor(GOLDEN["reinforce_pp_baseline"], dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(adv.reinforce_pp_advantages(X["rewards"], G, baseline="none", response_lengths=lengths),
                               torch.tensor(GOLDEN["reinforce_pp"], dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(adv.remax_advantages(X["rewards"], G, X["greedy"]),
                               torch.tensor(GOLDEN["remax"], dtype=torch.float64), rtol=0, atol=1e-12)
    # verl computes GPG's alpha = B / nonzero rewards in float32
    torch.testing.assert_close(adv.gpg_advantages(X["rewards"], G, alpha="nonzero"),
                               torch.tensor(GOLDEN["gpg_nonzero"], dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("ours_name, verl_name", [("k3+", "low_var_kl+"), ("k1+", "k1+")])
def test_straight_through_kl_equals_verl(ours_name, verl_name):
    logp = X["logp"].clone().requires_grad_(True)
    kl = kl_estimate(logp, X["old"], ours_name)
    (kl * X["mask"]).sum().backward()
    torch.testing.assert_close(kl.detach(), torch.tensor(GOLDEN[verl_name]["value"], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(logp.grad, torch.tensor(GOLDEN[verl_name]["grad"], dtype=torch.float64), rtol=0, atol=1e-12)


def test_truncated_importance_weights_equal_verl():
    weights, _ = mismatch.rollout_correction(X["old"], X["logp"], X["mask"], mode="tis", threshold=2.0)
    torch.testing.assert_close(weights, torch.tensor(GOLDEN["tis_weights"], dtype=torch.float64), rtol=0, atol=1e-12)
