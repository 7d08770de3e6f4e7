import random
import re

import pytest

from data_pipelines.arithmetic import FILLER_SENTENCES, ArithmeticSpec, generate, make_problem


def _evaluate(question: str) -> int:
    numbers = [int(n) for n in re.findall(r"\d+", question)]
    value = numbers[0]
    ops = re.findall(r"gets \d+ more|gives away \d+|[+-] \d+", question)
    for op, n in zip(ops, numbers[1:]):
        value = value + n if ("more" in op or op.startswith("+")) else value - n
    return value


def test_answers_are_correct_and_reasoning_ends_with_them():
    spec = ArithmeticSpec(digits=3, num_ops=3, verbosity=0.5)
    rng = random.Random(0)
    for _ in range(200):
        problem = make_problem(rng, spec)
        assert int(problem["answer"]) == _evaluate(problem["question"]) >= 0
        reasoning = problem["reasoning"]
        for filler in FILLER_SENTENCES:
            reasoning = reasoning.replace(" " + filler, "")
        assert reasoning.endswith(f"={problem['answer']}.")


def test_difficulty_and_verbosity_knobs():
    easy = generate(ArithmeticSpec(digits=1, num_ops=1), 50, seed=0)
    hard = generate(ArithmeticSpec(digits=3, num_ops=3), 50, seed=0)
    mean_len = lambda rows: sum(len(r["messages"][1]["reasoning_content"]) for r in rows) / len(rows)
    assert mean_len(hard) > 3 * mean_len(easy)
    verbose = generate(ArithmeticSpec(verbosity=1.0), 20, seed=0)
    for row in verbose:
        reasoning = row["messages"][1]["reasoning_content"]
        fillers = row["filler_sentences"][0]
        assert fillers and all(f in FILLER_SENTENCES and f in reasoning for f in fillers)
    assert all(r["filler_sentences"] == [[]] for r in generate(ArithmeticSpec(verbosity=0.0), 20, seed=0))


def test_response_level_verbosity_gives_a_filler_after_every_step_or_none():
    rows = generate(ArithmeticSpec(verbosity=0.7, filler_style="response"), 400, seed=0)
    verbose = 0
    for row in rows:
        reasoning = row["messages"][1]["reasoning_content"]
        fillers = row["filler_sentences"][0]
        parts = [p for p in reasoning.replace(": ", ":|").replace(". ", ".|").split("|") if p]
        steps = [p for p in parts if p not in FILLER_SENTENCES]
        if fillers:
            verbose += 1
            assert len(fillers) == len(steps)  # one after each step
            assert all(parts[2 * i + 1] == fillers[i] for i in range(len(steps)))
        else:
            assert parts == steps
    assert abs(verbose / len(rows) - 0.7) < 0.07  # 400 draws: standard error 0.023
    with pytest.raises(ValueError, match="filler_style"):
        ArithmeticSpec(filler_style="sentence")


def test_multi_turn_and_reproducibility():
    rows = generate(ArithmeticSpec(turns=3), 5, seed=7)
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"] * 3
    assert rows[0]["answer"] == rows[0]["turn_answers"][-1]
    assert rows == generate(ArithmeticSpec(turns=3), 5, seed=7)
    assert rows != generate(ArithmeticSpec(turns=3), 5, seed=8)


def test_fillers_per_step_inserts_that_many_sentences_after_each_verbose_step():
    rng_a, rng_b = random.Random(3), random.Random(3)
    one = make_problem(rng_a, ArithmeticSpec(digits=2, verbosity=1.0))
    two = make_problem(rng_b, ArithmeticSpec(digits=2, verbosity=1.0, fillers_per_step=2))
    steps = len(re.findall(r"[.:](?= |$)", one["reasoning"])) - len(one["fillers"])  # sentences that are not fillers
    assert len(one["fillers"]) == steps and len(two["fillers"]) == 2 * steps
    stripped = two["reasoning"]
    for filler in two["fillers"]:
        stripped = stripped.replace(" " + filler, "", 1) if not stripped.startswith(filler) else stripped
    assert stripped.endswith(f"={two['answer']}.")
    with pytest.raises(ValueError, match="data.fillers_per_step must be >= 1"):
        ArithmeticSpec(fillers_per_step=0)
