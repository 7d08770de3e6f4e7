"""Generate tests/algorithms/verl_golden.json: verl's core_algos on fixed float64 tensors (inputs stored with them).

Run once in a separate venv that has verl (its wheel is pure Python but pins transformers < 5.11 and tensordict
<= 0.10, which our own pins do not allow, so verl is not a test dependency of this repo):

    python3 -m venv /tmp/verlvenv && /tmp/verlvenv/bin/pip install torch transformers 'tensordict<=0.10.0' \
        pyvers orjson codetiming pylatexenc numpy omegaconf hydra-core && /tmp/verlvenv/bin/pip install --no-deps verl
    /tmp/verlvenv/bin/python tests/algorithms/verl_golden.py

tests/algorithms/test_verl_equivalence.py compares our functions with the stored numbers (values and gradients).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

OUT = Path(__file__).with_name("verl_golden.json")
B, T, G = 6, 7, 3


def inputs() -> dict:
    gen = torch.Generator().manual_seed(1234)
    logp = torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.5 - 1.2
    old = logp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3
    mask = torch.ones(B, T, dtype=torch.float64)
    for i, length in enumerate([7, 5, 3, 6, 1, 4]):
        mask[i, length:] = 0
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 1.0], dtype=torch.float64)  # second group all equal
    rewards_binary = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    greedy = torch.tensor([0.5, 0.5, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64)
    adv = torch.tensor([1.3, -0.4, 0.0, -1.1, 0.7, 2.0], dtype=torch.float64)
    return {"logp": logp, "old": old, "mask": mask, "rewards": rewards, "rewards_binary": rewards_binary,
            "greedy": greedy, "adv": adv}


def loss_and_grad(fn, x: dict, **kwargs) -> dict:
    logp = x["logp"].clone().requires_grad_(True)
    adv = x["adv"][:, None].expand(B, T) * x["mask"]
    loss, _ = fn(old_log_prob=x["old"], log_prob=logp, advantages=adv, response_mask=x["mask"], **kwargs)
    loss.backward()
    return {"loss": loss.item(), "grad": logp.grad.tolist()}


def outcome(x: dict, key: str = "rewards") -> torch.Tensor:
    """verl's token-level rewards: the scalar on each response's last token."""
    scores = torch.zeros(B, T, dtype=torch.float64)
    lengths = x["mask"].sum(1).long()
    scores[torch.arange(B), lengths - 1] = x[key]
    return scores


def main() -> None:
    from verl.trainer.ppo import core_algos as ca
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights
    from verl.workers.config import ActorConfig
    from verl.workers.config.actor import PolicyLossConfig

    x = inputs()
    index = np.array([i // G for i in range(B)])

    def actor(**kw):
        policy_loss = PolicyLossConfig(**kw.pop("policy_loss", {}))
        return ActorConfig(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=1, policy_loss=policy_loss, **kw)

    out = {"inputs": {k: v.tolist() for k, v in x.items()}, "B": B, "T": T, "G": G}
    out["gspo"] = loss_and_grad(ca.compute_policy_loss_gspo, x, config=actor(clip_ratio_low=0.05, clip_ratio_high=0.08))
    out["cispo"] = loss_and_grad(ca.compute_policy_loss_cispo, x, config=actor(clip_ratio_low=1.0, clip_ratio_high=0.28),
                                 loss_agg_mode="token-mean")
    out["gpg_loss"] = loss_and_grad(ca.compute_policy_loss_gpg, x, config=actor(), loss_agg_mode="token-mean")
    # clip-cov: a window [lb, ub] wide enough that the selection is random; the seed fixes torch.randperm's draw
    torch.manual_seed(7)
    out["clip_cov"] = loss_and_grad(ca.compute_policy_loss_clip_cov, x, loss_agg_mode="token-mean",
                                    config=actor(clip_ratio_low=0.2, clip_ratio_high=0.2,
                                                 policy_loss={"clip_cov_ratio": 0.1, "clip_cov_lb": 0.0, "clip_cov_ub": 5.0}))
    out["clip_cov_seed"] = 7
    out["kl_cov"] = loss_and_grad(ca.compute_policy_loss_kl_cov, x, loss_agg_mode="token-mean",
                                  config=actor(policy_loss={"kl_cov_ratio": 0.2, "ppo_kl_coef": 1.0}))
    # advantages (verl returns [B, T]; every token of a response has the same value)
    first = lambda a: a[:, 0].tolist()
    adv, _ = ca.compute_reinforce_plus_plus_baseline_outcome_advantage(outcome(x), x["mask"], index)
    out["reinforce_pp_baseline"] = first(adv)
    adv, _ = ca.compute_reinforce_plus_plus_outcome_advantage(outcome(x), x["mask"], config=OmegaConf.create({"gamma": 1.0}))
    out["reinforce_pp"] = first(adv)
    adv, _ = ca.compute_remax_outcome_advantage(outcome(x), x["greedy"], x["mask"])
    out["remax"] = first(adv)
    adv, _ = ca.compute_gpg_outcome_advantage(outcome(x), x["mask"], index)
    out["gpg_nonzero"] = first(adv)
    # k3+ (verl "low_var_kl+"): value and gradient with respect to logprob
    ref = x["old"]
    for name in ("low_var_kl+", "k1+"):
        logp = x["logp"].clone().requires_grad_(True)
        kl = ca.kl_penalty(logp, ref, name)
        (kl * x["mask"]).sum().backward()
        out[name] = {"value": kl.tolist(), "grad": logp.grad.tolist()}
    # rollout correction: token-level truncated IS, threshold 2 ("old" plays pi_old, "logp" the rollout's log-probs)
    weights, _ = compute_rollout_correction_weights(x["old"] - x["logp"], x["mask"], rollout_is="token", rollout_is_threshold=2.0)
    out["tis_weights"] = weights.tolist()
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    import verl

    print(f"wrote {OUT} with verl {verl.__version__}")


if __name__ == "__main__":
    main()
