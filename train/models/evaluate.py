"""Held-out evaluation: correctness of the final answer (math-verify, time-limited: the RL correctness reward's
scoring, rewards/correctness.py, so ``\\frac{1}{2}`` and ``0.5`` or ``x=3`` and ``3`` agree) and response
lengths, of greedy completions and, when asked, of k sampled completions per problem (pass@1 averaged over k
samples, as DeepSeek-R1 reports it: greedy decoding hides how a policy answers when sampled, e.g. how often it
takes a verbose style). ``python -m train.eval`` (train/eval/) adds pass@k and maj@k on the same scoring."""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

from data_pipelines.chat_format import generation_prompt
from data_pipelines.prompts import prompt_messages
from rewards.correctness import CorrectnessReward
from train.models.runtime import autocast, component_dtype
from train.models.sampling import cut_at_eos, left_padded, sample


@contextmanager
def _eval_mode(model):
    """``model`` in eval mode for the block (its device is yielded), then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield next(model.parameters()).device
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[list[int]]:
    """Greedy completions (token ids, without the prompt, cut at end of turn) of ``prompts``."""
    completions = []
    with _eval_mode(model) as device:
        for i in range(0, len(prompts), batch_size):
            enc = left_padded(tokenizer, prompts[i : i + batch_size], device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                completions.append(cut_at_eos(row, tokenizer.eos_token_id, tokenizer.pad_token_id)[0])
    return completions


@torch.no_grad()
def generate_sampled(model, tokenizer, prompts: list[str], samples: int, max_new_tokens: int, temperature: float = 1.0,
                     top_p: float = 1.0, batch_size: int = 64, seed: int = 0) -> list[list[int]]:
    """``samples`` sampled completions of each prompt (prompt 0's first), cut after end of turn; the same
    seed gives the same completions."""
    per_batch = max(1, batch_size // samples)
    completions = []
    with _eval_mode(model) as device:
        generator = torch.Generator(device=device).manual_seed(seed)
        for i in range(0, len(prompts), per_batch):
            enc = left_padded(tokenizer, prompts[i : i + per_batch], device)
            out = sample(model, enc["input_ids"], enc["attention_mask"], max_new_tokens, tokenizer.eos_token_id,
                         tokenizer.pad_token_id, temperature, top_p, generator, group_size=samples)
            for row in out.tolist():
                completions.append(cut_at_eos(row, tokenizer.eos_token_id, tokenizer.pad_token_id)[0])
    return completions


class AnswerScorer:
    """Whether each response's final answer equals its reference: the correctness reward's math-verify check
    (text after ``answer_after`` searched, equivalent forms accepted, ``time_limit_s`` per sample, scored in a
    child process; a response over the limit is wrong). A missing reference (None) is wrong."""

    def __init__(self, time_limit_s: float = 5.0, answer_after: str | None = "</think>"):
        self.reward = CorrectnessReward(time_limit_s=time_limit_s, answer_after=answer_after)

    def __call__(self, texts: list[str], answers: list[str | None]) -> list[bool]:
        known = [i for i, answer in enumerate(answers) if answer is not None]
        correct = [False] * len(texts)
        if known:
            scores, _ = self.reward(None, [texts[i] for i in known], None, [{"answer": str(answers[i])} for i in known])
            for i, score in zip(known, scores.tolist()):
                correct[i] = score > 0.5
        return correct

    def close(self) -> None:
        self.reward.close()


@functools.cache
def default_scorer() -> AnswerScorer:
    """One scorer (one math-verify child process) shared by every evaluation of this process."""
    return AnswerScorer()


def _scores(tokenizer, completions: list[list[int]], answers: list[str], prefix: str,
            scorer: AnswerScorer | None = None) -> tuple[dict, list[str], list[bool]]:
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    correct = (scorer or default_scorer())(texts, answers)
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float)
    truncated = [tokenizer.eos_token_id not in c for c in completions]
    metrics = {
        f"{prefix}accuracy": sum(correct) / len(completions),
        f"{prefix}response_length_mean": lengths.mean().item(),
        f"{prefix}response_length_p90": lengths.quantile(0.9).item(),
        f"{prefix}truncated_fraction": sum(truncated) / len(completions),
        f"{prefix}tokens_per_correct": lengths.sum().item() / max(sum(correct), 1),
    }
    return metrics, texts, correct


def eval_prompts(tokenizer, rows: list[dict]) -> list[str]:
    """The generation prompt of each held-out row (its prompt messages in the chat template)."""
    return [generation_prompt(tokenizer, prompt_messages(row)) for row in rows]


def evaluate(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 64, samples: int = 0,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, scorer: AnswerScorer | None = None,
             precision: str = "auto") -> dict:
    """Greedy: eval/accuracy (the final answer checked by math-verify), eval/response_length (mean, p90),
    eval/truncated_fraction, eval/tokens_per_correct. With ``samples`` = k > 0 the same over k completions
    per problem sampled at ``temperature`` / ``top_p``, under eval/sampled_* (accuracy = pass@1 averaged over k).
    Generation runs in ``trainer.precision``'s evaluation dtype (``precision``): bf16 autocast on a GPU, fp32 on CPU."""
    prompts = eval_prompts(tokenizer, rows)
    device = next(model.parameters()).device
    with autocast(device, component_dtype("evaluation", precision, device)):  # bf16 on a GPU, fp32 on CPU
        completions = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
        sampled = generate_sampled(model, tokenizer, prompts, samples, max_new_tokens, temperature, top_p, batch_size,
                                   seed) if samples > 0 else None
    return score_completions(tokenizer, rows, prompts, completions, sampled, samples, scorer)


def pool_completions(pool, tokenizer, prompts: list[str], samples: int, max_new_tokens: int, temperature: float,
                     top_p: float, batch_size: int, seed: int) -> list[list[int]]:
    """``samples`` completions of each prompt (prompt 0's first) from a rollout pool (train/workers/actors.py
    ``RolloutPool``: its workers' ``generate``, the KV-cache loop whose temperature 0 is ``generate``'s greedy
    decoding), read off as ``generate_greedy`` / ``generate_sampled`` read theirs. ``batch_size`` prompts x samples
    per worker and call, as the driver's batches; each call is seeded by ``seed`` + its first prompt's index."""
    per_call = max(1, batch_size // max(samples, 1)) * len(pool.workers)
    completions = []
    for start in range(0, len(prompts), per_call):
        rollouts = pool.generate(prompts[start : start + per_call], samples, seed=seed + start,
                                 max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        completions += [cut_at_eos(r.response_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)[0] for r in rollouts]
    return completions


def evaluate_on_pool(pool, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 64, samples: int = 0,
                     temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, scorer: AnswerScorer | None = None) -> dict:
    """``evaluate`` with the generation on a rollout pool's workers (their devices, the rollout precision, the
    weights they hold), the scoring here: the same metrics. The greedy completions are those of ``evaluate`` on a
    model with the workers' weights; the sampled ones come from the workers' own seeded generators."""
    prompts = eval_prompts(tokenizer, rows)
    completions = pool_completions(pool, tokenizer, prompts, 1, max_new_tokens, 0.0, 1.0, batch_size, seed)
    sampled = pool_completions(pool, tokenizer, prompts, samples, max_new_tokens, temperature, top_p, batch_size,
                               seed) if samples > 0 else None
    return score_completions(tokenizer, rows, prompts, completions, sampled, samples, scorer)


def score_completions(tokenizer, rows: list[dict], prompts: list[str], completions: list[list[int]],
                      sampled: list[list[int]] | None = None, samples: int = 0, scorer: AnswerScorer | None = None) -> dict:
    """The metrics of ``evaluate`` from the greedy ``completions`` (one per row) and the ``sampled`` ones (``samples``
    per row, row 0's first; None: no eval/sampled_*), and the first rows as samples for the log."""
    metrics, texts, correct = _scores(tokenizer, completions, [row["answer"] for row in rows], "eval/", scorer)
    if sampled is not None:
        metrics.update(_scores(tokenizer, sampled, [row["answer"] for row in rows for _ in range(samples)], "eval/sampled_",
                               scorer)[0])
    return {
        **metrics,
        "samples": [
            {"prompt": p, "response": t, "answer": row["answer"], "correct": c}
            for p, t, row, c in list(zip(prompts, texts, rows, correct))[:8]
        ],
    }
