"""PromptCoT synthesis components (data_pipelines/synthesis/): the generator's ground truth, concept combinations,
problem parsing, and the integer fast path of the answer scorer (the recipe that runs them: tests/train/synthesis/)."""

import random
import re

import pytest
from omegaconf import OmegaConf

from data_pipelines.arithmetic import ArithmeticSpec, make_problem
from data_pipelines.synthesis.concepts import ConceptSampler, load_concepts
from data_pipelines.synthesis.estimate import AnswerScorer
from data_pipelines.synthesis.generators import parse_problem
from tests.conftest import REPO


def test_generator_ground_truth_counts_columns_and_regroupings():
    rng = random.Random(3)
    for _ in range(100):
        problem = make_problem(rng, ArithmeticSpec(digits=3, num_ops=3))
        columns = re.findall(r"\b\d([+-])\d[+-]\d=\d( borrow 1)?", problem["reasoning"])
        assert problem["column_steps"] == len(columns)
        sums = [int(a) + int(b) + int(c) for a, b, c in re.findall(r"\b(\d)\+(\d)\+(\d)=", problem["reasoning"])]
        assert problem["carries"] == sum(s >= 10 for s in sums)
        assert problem["borrows"] == sum(1 for _, borrow in columns if borrow)


def test_concept_combinations_respect_groups_and_incompatibilities():
    concepts = load_concepts(OmegaConf.load(REPO / "configs/synthesis/arithmetic.yaml").concepts)
    group = {c.id: c.group for c in concepts}
    sampler = ConceptSampler(concepts, 3, ["digits", "chain"])
    for i in range(300):
        chosen = [c.id for c in sampler.sample(random.Random(i))]
        groups = [group[c] for c in chosen]
        assert len(set(groups)) == 3 and {"digits", "chain"} <= set(groups)
        assert not {"sub_borrow", "digits_1"} <= set(chosen)


def test_integer_fast_path_matches_the_correctness_reward():
    responses = ["<think>2+2</think> The answer is \\boxed{4}.", "<think>x</think> \\boxed{5}", "\\boxed{ 4 }",
                 "<think>\\boxed{4}</think> so \\boxed{3}", "The answer is 4.", "\\boxed{4} or \\boxed{5}",
                 "\\boxed{1/2}", "\\boxed{0.5}", "<think>a</think>\\boxed{12}", "\\boxed{-7}"]
    answers = ["4", "4", "4", "4", "4", "4", "0.5", "1/2", "12", "-7"]
    fast, slow = AnswerScorer(fast_integers=True), AnswerScorer(fast_integers=False)
    try:
        assert fast.score(responses, answers) == slow.score(responses, answers)
        assert slow.score(responses[:2], answers[:2]) == [1.0, 0.0]
    finally:
        fast.close(), slow.close()


def test_parse_problem_reads_the_prompted_format():
    text = "<think>plan</think>Problem: Find x if 3x = 12.\nAnswer: \\boxed{4}"
    assert parse_problem(text) == ("Find x if 3x = 12.", "4")
    with pytest.raises(ValueError, match=r"prompts\.problem"):
        parse_problem("Problem: Find x.")
