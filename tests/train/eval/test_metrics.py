"""pass@k (unbiased estimator) against float64 binomials, maj@k votes, and the answer a sample votes for."""

from math import comb

import pytest

from train.eval.metrics import length_stats, majority_correct, pass_at_k, vote_answer


@pytest.mark.parametrize("n, c, k", [(10, 3, 1), (10, 3, 4), (16, 1, 8), (16, 0, 4), (5, 5, 5), (64, 7, 32), (4, 2, 3)])
def test_pass_at_k_equals_one_minus_binomial_ratio_in_float64(n, c, k):
    golden = 1.0 - comb(n - c, k) / comb(n, k)  # exact integers, one float64 division
    assert pass_at_k(n, c, k) == pytest.approx(golden, rel=1e-12, abs=1e-15)


def test_pass_at_k_special_values():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1 = c / n
    assert pass_at_k(4, 2, 3) == 1.0  # n - c < k: any 3 of 4 include a correct one
    assert pass_at_k(4, 0, 4) == 0.0
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_majority_vote_over_parsed_answers():
    assert majority_correct(["7", "6", "7", None], [True, False, True, False])
    assert not majority_correct(["6", "7", "6", "7"], [False, True, False, True])  # tie: the first answer given wins
    assert not majority_correct([None, None], [False, False])  # nobody voted
    assert majority_correct([None, "3", "4"], [False, True, False])  # tie 1-1: "3" came first


def test_vote_answer_reads_the_final_answer():
    assert vote_answer("<think>maybe \\boxed{5}</think> so \\boxed{ \\frac{1}{2} }.") == "\\frac{1}{2}"
    assert vote_answer("<think>12 and 3</think> it is 1,015.") == "1015"
    assert vote_answer("no answer at all") is None


def test_length_stats_p90_by_hand():
    stats = length_stats([10, 20, 30, 40, 50, 60, 70, 80, 90, 100])
    assert stats["response_length_mean"] == 55.0
    assert stats["response_length_p90"] == pytest.approx(91.0)  # 90 + 0.1 * (100 - 90), linear interpolation
