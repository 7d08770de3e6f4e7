"""math-verify correctness: equivalent forms accepted, wrong answers rejected, hard per-sample time limit."""

import random
import string
import threading
import time

import pytest

from rewards.correctness import CorrectnessReward


@pytest.fixture(scope="module")
def reward():
    fn = CorrectnessReward(time_limit_s=2.0)
    yield fn
    fn.close()


def _score(reward, responses, answers):
    scores, diagnostics = reward(None, responses, None, [{"answer": a, "difficulty": {}} for a in answers])
    return scores.tolist(), diagnostics["timed_out"].tolist()


def test_equivalent_forms_accepted(reward):
    responses = ["<think>half</think> The answer is \\boxed{0.5}.", "\\boxed{\\frac{1}{2}}", "The answer is 1/2",
                 "<think>\nCompute 59 + 15. 9+5+0=14.\n</think>\n\nThe answer is \\boxed{74}.", "$\\frac{1}{2}$"]
    scores, _ = _score(reward, responses, ["1/2", "0.5", "\\frac{1}{2}", "74", "0.5"])
    assert scores == [1.0] * 5


def test_wrong_answers_rejected(reward):
    responses = ["\\boxed{0.25}", "<think>74</think> The answer is \\boxed{75}.", "no answer here", ""]
    scores, _ = _score(reward, responses, ["1/2", "74", "3", "3"])
    assert scores == [0.0] * 4


def test_answer_searched_after_think_only(reward):
    scores, _ = _score(reward, ["<think>the answer might be \\boxed{74}</think> \\boxed{70}"], ["74"])
    assert scores == [0.0]


def test_garbage_10kb_returns_zero_within_limit_from_a_thread(reward):
    rng = random.Random(0)
    garbage = "".join(rng.choice(string.printable) for _ in range(10_000))
    result = {}

    def run():  # reward workers call from non-main threads: signal-based timeouts would raise there
        start = time.monotonic()
        result["scores"] = _score(reward, [garbage, "\\boxed{7}"], ["7", "7"])
        result["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert result["scores"][0] == [0.0, 1.0]
    # the property is "returns, from a thread" (a hang fails the join above); the bound is generous so that a
    # loaded machine passes: two limits of 2 s plus a worker restart, with a wide margin
    assert result["elapsed"] < 20.0


def test_pathological_expression_times_out_and_pool_recovers(reward):
    start = time.monotonic()
    scores, timed_out = _score(reward, ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{3}"], ["5", "3"])
    assert scores == [0.0, 1.0]
    # 9^9^9^9 never finishes without the limit; one limit of 2 s plus a worker restart, with a wide margin for load
    assert time.monotonic() - start < 30.0
    assert timed_out == [True, False]


def test_missing_answer_key_names_the_row(reward):
    with pytest.raises(KeyError, match="metadata row 0"):
        reward(None, ["\\boxed{1}"], None, [{"difficulty": {}}])
