"""Evaluation metrics over k samples per problem: pass@k (unbiased estimator), maj@k, and the answer a vote counts.

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv 2107.03374, eq. 1): with n
samples of a problem, c of them correct, the probability that at least one of k samples drawn without replacement
is correct,

    pass@k = 1 - C(n - c, k) / C(n, k)     (= 1 when n - c < k)

computed as 1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms the binomials (numerically stable).

maj@k (self-consistency, Wang et al. 2022, arXiv 2203.11171; "maj@k" in Minerva, Lewkowycz et al. 2022): the
answer most of the k samples give (ties: the one given first) is the problem's answer; it is right when that
answer's samples are right. Samples without a parsed answer do not vote.
"""

from __future__ import annotations

import re

import numpy as np

from data_pipelines.dataset_shapes import last_boxed

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct (k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def vote_answer(text: str, answer_after: str | None = "</think>") -> str | None:
    """The answer a sample votes for: the last ``\\\\boxed{}`` after ``answer_after`` (else the last number there),
    spaces removed; None when there is neither."""
    if answer_after and answer_after in text:
        text = text.rsplit(answer_after, 1)[1]
    found = last_boxed(text)
    if found is None:
        numbers = _NUMBER.findall(text)
        found = numbers[-1].replace(",", "") if numbers else None
    return None if found is None else re.sub(r"\s+", "", found).rstrip(".") or None


def majority_correct(votes: list[str | None], correct: list[bool]) -> bool:
    """maj@k of one problem: whether the most frequent vote (first given on ties) belongs to a correct sample."""
    counts: dict[str, int] = {}
    for vote in votes:
        if vote is not None:
            counts[vote] = counts.get(vote, 0) + 1
    if not counts:
        return False
    winner = max(counts, key=counts.get)  # dicts keep insertion order: ties go to the first vote given
    return any(ok for vote, ok in zip(votes, correct) if vote == winner)


def length_stats(lengths: list[int]) -> dict:
    """mean and p90 (linear interpolation, numpy's default) of response lengths in tokens."""
    array = np.asarray(lengths, dtype=np.float64)
    return {"response_length_mean": float(array.mean()), "response_length_p90": float(np.percentile(array, 90))}
