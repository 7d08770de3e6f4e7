"""Stage 4, difficulty estimation: the pass rate of a solver over k samples, and a label from thresholds.

    pass_rate = (1/k) sum_i correct(response_i, answer)        label = first label (highest threshold first)
                                                                       whose threshold <= pass_rate

``correct`` is the framework's correctness reward (rewards/correctness.py: math-verify on the text after
``</think>``), so "solved" means the same here as in RL. Identical (answer part, reference) pairs are scored
once, and with ``fast_integers`` a response whose answer part holds exactly one ``\boxed{}`` integer is compared
with an integer reference directly (math-verify's verdict on two integer literals, without its ~10 ms parse;
tested equal to the reward). The label comes only from measured pass rates; nothing here reads a generator's
ground truth.
"""

from __future__ import annotations

import re

from rewards.correctness import CorrectnessReward, _answer_part

_INTEGER = re.compile(r"^[+-]?\d+$")
_BOXED_INTEGER = re.compile(r"\\boxed\{\s*([+-]?\d+)\s*\}")


def check_labels(labels) -> list[tuple[str, float]]:
    """``difficulty.labels`` ({label: minimum pass rate}) as (label, threshold), highest threshold first."""
    items = [(str(k), float(v)) for k, v in dict(labels or {}).items()]
    bad = [(k, v) for k, v in items if not 0.0 <= v <= 1.0]
    if not items or bad:
        raise ValueError(f"difficulty.labels must map label -> minimum pass rate in [0, 1], got {dict(labels or {})}")
    if min(v for _, v in items) > 0.0:
        raise ValueError(f"difficulty.labels={dict(items)}: one label needs threshold 0.0 so every pass rate gets a label")
    return sorted(items, key=lambda kv: -kv[1])


def label_for(pass_rate: float, labels: list[tuple[str, float]]) -> str:
    return next(name for name, threshold in labels if pass_rate >= threshold)


class AnswerScorer:
    """1/0 per (response, reference answer) with the correctness reward; duplicates are scored once."""

    def __init__(self, time_limit_s: float = 5.0, answer_after: str | None = "</think>", fast_integers: bool = True):
        self.reward = CorrectnessReward(time_limit_s=time_limit_s, answer_after=answer_after)
        self.answer_after, self.fast_integers = answer_after, fast_integers

    def _integer_verdict(self, answer_part: str, reference: str) -> float | None:
        if not self.fast_integers or not _INTEGER.match(reference.strip()) or answer_part.count("\\boxed") != 1:
            return None
        found = _BOXED_INTEGER.search(answer_part)
        return None if found is None else float(int(found.group(1)) == int(reference))

    def score(self, responses: list[str], answers: list[str]) -> list[float]:
        keys = [(_answer_part(r, self.answer_after), str(a)) for r, a in zip(responses, answers)]
        by_key = {}
        for key in dict.fromkeys(keys):
            verdict = self._integer_verdict(*key)
            if verdict is not None:
                by_key[key] = verdict
        rest = [k for k in dict.fromkeys(keys) if k not in by_key]
        if rest:
            scores, _ = self.reward(None, [k[0] for k in rest], None, [{"answer": k[1]} for k in rest])
            by_key.update(zip(rest, scores.tolist()))
        return [by_key[k] for k in keys]

    def close(self) -> None:
        self.reward.close()


def estimate(rows: list[dict], solver, scorer: AnswerScorer, samples: int, labels, seeds: list[int]) -> list:
    """Per row: {pass_rate, num_samples, num_correct, label, solver, correct_response} or the solver's ItemError."""
    outputs = solver.solve([row["question"] for row in rows], samples, seeds)
    flat = [(i, text) for i, texts in enumerate(outputs) if isinstance(texts, list) for text in texts]
    scores = scorer.score([text for _, text in flat], [rows[i]["answer"] for i, _ in flat])
    per_row: dict[int, list[tuple[str, float]]] = {}
    for (i, text), score in zip(flat, scores):
        per_row.setdefault(i, []).append((text, score))
    payloads = []
    for i, texts in enumerate(outputs):
        if not isinstance(texts, list):
            payloads.append(texts)
            continue
        scored = per_row.get(i, [])
        correct = sum(score for _, score in scored)
        pass_rate = correct / len(scored)
        payloads.append({
            "pass_rate": pass_rate, "num_samples": len(scored), "num_correct": int(correct),
            "label": label_for(pass_rate, labels), "solver": solver.name,
            "correct_response": next((text for text, score in scored if score > 0), None),
        })
    return payloads
