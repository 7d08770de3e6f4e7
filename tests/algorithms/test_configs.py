"""Algorithm and reward configs compose with Hydra and instantiate into callables with the documented math."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALGORITHMS = ["grpo", "dapo", "dr_grpo", "rloo", "aapo", "gspo", "cispo", "reinforce_pp", "remax", "gpg"]


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _algorithm(name):
    if (CONFIGS / "config.yaml").exists():
        cfg = _compose([f"algorithm={name}", "reward=[correctness,format,bingo]"])
        assert set(cfg.reward) == {"correctness", "format", "bingo"}
        return cfg.algorithm
    return OmegaConf.load(CONFIGS / "algorithm" / f"{name}.yaml")


@pytest.mark.parametrize("name", ALGORITHMS)
def test_algorithm_config_instantiates_and_runs(name):
    alg = _algorithm(name)
    assert alg.name == name and alg.recipe == "rl"
    group = max(alg.group_size, 2)
    rewards = torch.tensor([1.0, 0.0] * (group // 2) + [1.0] * group)  # [2 * G]
    advantage_fn = instantiate(alg.advantage)
    if alg.momentum_rollout or alg.greedy_rollout:  # AAPO's momentum / ReMax's greedy rewards
        advantages = advantage_fn(rewards, group, torch.zeros_like(rewards))
    elif name == "reinforce_pp":  # token whitening reads the response lengths
        advantages = advantage_fn(rewards, group, response_lengths=torch.full_like(rewards, 5))
    else:
        advantages = advantage_fn(rewards, group)
    assert advantages.shape == rewards.shape
    loss_fn = instantiate(alg.loss)
    logp = torch.randn(2 * group, 5, requires_grad=True)
    mask = torch.ones(2 * group, 5)
    loss, metrics = loss_fn(logp, logp.detach(), advantages, mask, ref_logprobs=logp.detach())
    loss.backward()
    assert torch.isfinite(loss) and "policy_loss" in metrics
    if alg.dynamic_sampling:
        keep, dropped = instantiate(alg.dynamic_sampling)(rewards, group)
        assert dropped == 1
    if alg.momentum:
        assert instantiate(alg.momentum)([torch.zeros(1)], [torch.ones(1)], step=1) in (True, False)


def test_variant_keys_reach_the_functions():
    alg = _algorithm("grpo")
    alg.loss.policy_loss.eps_high = 0.28
    alg.loss.aggregation.mode = "token-mean"
    alg.kl.beta = 0.1
    loss_fn = instantiate(alg.loss)
    assert loss_fn.keywords["policy_loss"].keywords["eps_high"] == 0.28
    assert loss_fn.keywords["aggregation"].keywords["mode"] == "token-mean"
    assert loss_fn.keywords["kl_beta"] == 0.1


def test_reward_group_composes_weighted_sum(tmp_path):
    from rewards.registry import build_reward

    nodes = {}
    for name in ("correctness", "format", "bingo"):
        nodes.update(OmegaConf.to_container(OmegaConf.load(CONFIGS / "reward" / f"{name}.yaml")))
    nodes["bingo"]["scorer"] = OmegaConf.to_container(OmegaConf.load(CONFIGS / "significance" / "exact_labels.yaml"))
    nodes["format"]["weight"] = 0.5
    reward_fn = build_reward(OmegaConf.create(nodes))
    try:
        responses = ["<think>\n2+2=4. Okay, moving on.\n</think>\n\nThe answer is \\boxed{4}.", "<think>x</think> \\boxed{5}"]
        total, parts, diagnostics = reward_fn(["q", "q"], responses, [[1, 2], [3]], [{"answer": "4", "extra": 1}] * 2,
                                              step=0, group_size=2)
        assert parts["correctness"].tolist() == [1.0, 0.0]
        assert parts["format"].tolist() == [1.0, 1.0]
        expected = parts["correctness"] + 0.5 * parts["format"] + parts["bingo"]
        torch.testing.assert_close(total, expected)
        assert "bingo/num_insignificant" in diagnostics
    finally:
        reward_fn.close()
