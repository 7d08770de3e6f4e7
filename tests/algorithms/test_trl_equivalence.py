"""Our GRPO losses equal TRL GRPOTrainer._compute_loss on identical tensors (tiny random model, fixed inputs).

TRL variant -> ours:  grpo -> seq-mean-token-mean, bnpo -> token-mean, dr_grpo -> seq-mean-token-sum-norm
(max_completion_length), dapo -> token-mean (num_items_in_batch = token count); epsilon/epsilon_high ->
eps_low/eps_high; delta -> dual_clip; beta -> k3 KL in the loss; scale_rewards group/batch/none -> scale.
"""

from functools import partial

import pytest
import torch

trl = pytest.importorskip("trl")

from algorithms.advantages import group_relative_advantages  # noqa: E402
from algorithms.aggregation import aggregate_loss  # noqa: E402
from algorithms.objective import policy_objective  # noqa: E402
from algorithms.policy_losses import clipped_surrogate  # noqa: E402

B, P, T, V = 4, 3, 6, 64


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=B, num_generations=B,
                      max_completion_length=T, beta=0.0, report_to=[], use_cpu=True, temperature=1.0)
    trainer = GRPOTrainer(model=Qwen2ForCausalLM(config), reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                          args=args, train_dataset=Dataset.from_dict({"prompt": ["t3 t4"] * B}), processing_class=tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _inputs(trainer):
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    completion_ids = torch.randint(3, V, (B, T), generator=g)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 4:] = 0  # a short response
    completion_mask[2, 1:] = 0  # a single-token response
    with torch.no_grad():
        logps = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([torch.ones(B, P, dtype=torch.long), completion_mask], 1), T)[0]
    old = logps + 0.3 * torch.randn(B, T, generator=g)  # ratios inside and outside the clip range
    ref = logps + 0.2 * torch.randn(B, T, generator=g)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0])
    return dict(prompt_ids=prompt_ids, prompt_mask=torch.ones(B, P, dtype=torch.long), completion_ids=completion_ids,
                completion_mask=completion_mask, old_per_token_logps=old, ref_per_token_logps=ref, rewards=rewards,
                num_items_in_batch=completion_mask.sum().float())


VARIANTS = [
    # (trl loss_type, epsilon, epsilon_high, delta, beta, our aggregation mode)
    ("grpo", 0.2, 0.2, None, 0.0, "seq-mean-token-mean"),
    ("grpo", 0.2, 0.28, None, 0.04, "seq-mean-token-mean"),
    ("bnpo", 0.2, 0.2, None, 0.04, "token-mean"),
    ("dr_grpo", 0.2, 0.2, None, 0.0, "seq-mean-token-sum-norm"),
    ("dapo", 0.2, 0.28, None, 0.0, "token-mean"),
    ("dapo", 0.2, 0.28, 1.5, 0.1, "token-mean"),
    ("grpo", 0.1, 0.1, 1.3, 0.0, "seq-mean-token-mean"),
]
BIAS_CORRECTED = [v for v in VARIANTS if v[4] > 0]


@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("loss_type,eps,eps_high,delta,beta,mode", BIAS_CORRECTED)
def test_kl_bias_correction_equal_trl(trainer, loss_type, eps, eps_high, delta, beta, mode, bias_correction):
    _compare(trainer, loss_type, eps, eps_high, delta, beta, mode, bias_correction)


@pytest.mark.parametrize("loss_type,eps,eps_high,delta,beta,mode", VARIANTS)
def test_loss_and_gradient_equal_trl(trainer, loss_type, eps, eps_high, delta, beta, mode):
    _compare(trainer, loss_type, eps, eps_high, delta, beta, mode, False)


def _compare(trainer, loss_type, eps, eps_high, delta, beta, mode, bias_correction):
    inputs = _inputs(trainer)
    advantages = group_relative_advantages(inputs["rewards"], 2, scale="group", eps=1e-4)  # TRL's formula and eps
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.epsilon_low, trainer.epsilon_high = eps, eps_high
    trainer.args.delta = delta
    trainer.args.use_bias_correction_kl = bias_correction
    trl_inputs = {k: v for k, v in inputs.items() if k != "rewards"} | {"advantages": advantages}

    trainer.model.zero_grad()
    trl_loss = trainer._compute_loss(trainer.model, trl_inputs)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in trainer.model.parameters()]

    trainer.model.zero_grad()
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logps = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention, T)[0]
    ours, _ = policy_objective(
        logps, inputs["old_per_token_logps"], advantages, inputs["completion_mask"],
        policy_loss=partial(clipped_surrogate, eps_low=eps, eps_high=eps_high, dual_clip=delta),
        aggregation=partial(aggregate_loss, mode=mode, max_response_len=T),
        ref_logprobs=inputs["ref_per_token_logps"], kl_beta=beta, kl_estimator="k3",
        kl_importance_weighted=bias_correction,
    )
    ours.backward()
    torch.testing.assert_close(ours, trl_loss, rtol=1e-6, atol=1e-7)
    for ours_grad, trl_grad in zip((p.grad for p in trainer.model.parameters()), trl_grads):
        torch.testing.assert_close(ours_grad, trl_grad, rtol=1e-5, atol=1e-7)


def test_advantages_equal_trl_formula():
    """TRL: (r - mean_g) / (std + 1e-4), std = trl nanstd (unbiased) per group or over the batch; "none": r - mean_g."""
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.25, 0.0, 0.0])
    grouped = rewards.view(-1, 4)
    mean = grouped.mean(1).repeat_interleave(4)
    group_std = nanstd(grouped, dim=1).repeat_interleave(4)
    torch.testing.assert_close(group_relative_advantages(rewards, 4, scale="group"), (rewards - mean) / (group_std + 1e-4))
    torch.testing.assert_close(group_relative_advantages(rewards, 4, scale="batch"), (rewards - mean) / (nanstd(rewards) + 1e-4))
    torch.testing.assert_close(group_relative_advantages(rewards, 4, scale="none"), rewards - mean)
