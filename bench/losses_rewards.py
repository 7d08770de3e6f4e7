"""Per-step cost of the RL loss and reward computations next to one forward pass of a small model.

    python bench/losses_rewards.py                       # 512 responses x 1024 tokens (the acceptance setting)
    python bench/losses_rewards.py --batch 64 --resp-len 256   # quick look

Prints milliseconds per step and the ratio to a forward pass (no grad) of the embedded tiny Qwen2
architecture on the same tokens; loss and rewards must be a small fraction of it. The self-information
significance scorer is itself a reference-model forward, so it is not listed: its cost is that forward.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from algorithms.advantages import group_relative_advantages
from algorithms.aggregation import aggregate_loss
from algorithms.objective import policy_objective
from algorithms.policy_losses import advantage_weighted_ce, clipped_surrogate
from data_pipelines.arithmetic import FILLER_SENTENCES
from rewards.bingo import BingoLengthReward
from rewards.correctness import CorrectnessReward
from rewards.format import format_reward
from rewards.length import cosine_length_reward, kimi_length_reward
from rewards.significance import ExactLabelScorer


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000.0


def make_responses(batch: int, words: int) -> tuple[list[str], list[dict]]:
    step = "9+5+0=14, write 4 carry 1."
    responses, metadata = [], []
    for i in range(batch):
        body = " ".join(step if (j + i) % 4 else FILLER_SENTENCES[j % len(FILLER_SENTENCES)] for j in range(words // 6))
        answer = str(74 + (i % 3 == 0))
        responses.append(f"<think>\nCompute 59 + 15. {body} So 59 + 15 = 74.\n</think>\n\nThe answer is \\boxed{{{answer}}}.")
        metadata.append({"answer": "74", "difficulty": {"digits": 2}})
    return responses, metadata


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--resp-len", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    B, T, G = args.batch, args.resp_len, args.group_size

    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=384, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(2048, T))
    model = Qwen2ForCausalLM(config).eval()
    tokens = torch.randint(0, 384, (B, T))  # [B, T]

    @torch.no_grad()
    def forward():
        for start in range(0, B, 32):
            model(input_ids=tokens[start : start + 32])

    forward_ms = timed(forward, repeats=1)

    g = torch.Generator().manual_seed(0)
    logits_logp = torch.randn(B, T, generator=g) * 0.3 - 1.0
    old, ref = logits_logp + 0.1 * torch.randn(B, T, generator=g), logits_logp + 0.1 * torch.randn(B, T, generator=g)
    mask = (torch.arange(T) < torch.randint(T // 2, T + 1, (B, 1), generator=g)).float()  # [B, T]
    rewards = torch.randint(0, 2, (B,), generator=g).float()

    def loss_step(policy_loss, mode, beta):
        logp = logits_logp.clone().requires_grad_(True)
        adv = group_relative_advantages(rewards, G)
        loss, _ = policy_objective(logp, old, adv, mask, policy_loss=policy_loss,
                                   aggregation=partial(aggregate_loss, mode=mode, max_response_len=T),
                                   ref_logprobs=ref, kl_beta=beta)
        loss.backward()

    rows = [
        ("loss grpo (clip + k3 KL, seq-mean-token-mean, fwd+bwd)", lambda: loss_step(partial(clipped_surrogate), "seq-mean-token-mean", 0.04)),
        ("loss dapo (clip-higher, token-mean, fwd+bwd)", lambda: loss_step(partial(clipped_surrogate, eps_high=0.28), "token-mean", 0.0)),
        ("loss aapo (advantage-weighted CE, fwd+bwd)", lambda: loss_step(advantage_weighted_ce, "token-mean", 0.0)),
    ]
    responses, metadata = make_responses(B, words=int(T * 0.75))
    response_ids = [list(range(T))] * B
    correctness = CorrectnessReward(time_limit_s=5.0)
    components = {"correctness": rewards}
    bingo = BingoLengthReward(ExactLabelScorer(FILLER_SENTENCES))
    rows += [
        ("reward correctness (math-verify, 1 worker process)", lambda: correctness(None, responses, response_ids, metadata)),
        ("reward format", lambda: format_reward(None, responses, response_ids, metadata)),
        ("reward bingo (exact labels)", lambda: bingo(None, responses, response_ids, metadata, step=0, group_size=G, components=components)),
        ("reward kimi length", lambda: kimi_length_reward(None, responses, response_ids, metadata, group_size=G, components=components)),
        ("reward cosine length", lambda: cosine_length_reward(None, responses, response_ids, metadata, components=components)),
    ]
    print(f"batch {B} x {T} tokens, {torch.get_num_threads()} threads; forward (tiny Qwen2, no grad): {forward_ms:.0f} ms")
    print(f"{'computation':58s} {'ms/step':>9s} {'/ forward':>10s}")
    for name, fn in rows:
        ms = timed(fn, repeats=1 if name.startswith("reward correctness") else 3)
        print(f"{name:58s} {ms:9.1f} {ms / forward_ms:10.4f}")
    correctness.close()


if __name__ == "__main__":
    main()
