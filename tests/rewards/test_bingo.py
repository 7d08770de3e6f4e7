"""Bingo: significance-aware length reward with exact labels, wrong-answer rule, and the dynamic schedule."""

import math
from pathlib import Path

import pytest
import torch

from data_pipelines.arithmetic import FILLER_SENTENCES
from rewards.bingo import BingoLengthReward, DynamicLengthSchedule, bingo_length_reward
from rewards.significance import ExactLabelScorer

HALF_PI = math.pi / 2
CORE = "<think>\nCompute 59 + 15. 9+5+0=14, write 4 carry 1. 5+1+1=7. So 59 + 15 = 74.\n</think>\n\nThe answer is \\boxed{74}."


def _with_filler(n: int) -> str:
    filler = " ".join(FILLER_SENTENCES[:n])
    return CORE.replace("write 4 carry 1.", f"write 4 carry 1. {filler}")


def test_exact_labels_mark_filler_words_insignificant():
    flags = ExactLabelScorer(FILLER_SENTENCES)([_with_filler(2)], None, [{}])[0]
    n_filler_words = sum(len(s.split()) for s in FILLER_SENTENCES[:2])
    assert int((~flags).sum()) == n_filler_words
    assert int(flags.sum()) == len(CORE.split())


def test_exact_labels_config_names_the_generator_sentences_and_rows_add_their_own():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs/significance/exact_labels.yaml")
    assert list(cfg.filler_sentences) == list(FILLER_SENTENCES)  # the config's copy of the generator's list
    from_rows = ExactLabelScorer()([_with_filler(2)], None, [{"filler_sentences": [list(FILLER_SENTENCES[:2])]}])[0]
    assert from_rows.tolist() == ExactLabelScorer(FILLER_SENTENCES)([_with_filler(2)], None, [{}])[0].tolist()
    assert bool(ExactLabelScorer()([_with_filler(2)], None, [{}])[0].all())  # no sentences named: all significant


def test_more_insignificant_tokens_lower_reward_at_equal_correctness_and_significant_length():
    bingo = BingoLengthReward(ExactLabelScorer(FILLER_SENTENCES), dynamic=False)
    responses = [CORE, _with_filler(1), _with_filler(3), _with_filler(5)]
    correct = torch.ones(4)
    reward, diag = bingo(None, responses, None, [{"answer": "74"}] * 4, step=0, group_size=4, components={"correctness": correct})
    assert diag["num_significant"].tolist() == [len(CORE.split())] * 4  # equal significant length
    assert reward[0] > reward[1] > reward[2] >= reward[3]
    assert reward[0].item() == pytest.approx(5.0)  # no filler: lambda_c * cos(0)


def test_formula_against_hand_values():
    # correct, low = 6/4 = 1.5 -> 5 cos(1.5); wrong, low = 2/4, high = 30/20 -> min(0, 2(cos .5 - 1) + w_e 1.5 - 5)
    w_e = 5 / HALF_PI
    reward, low, high = bingo_length_reward(
        torch.tensor([1, 0]), torch.tensor([10.0, 30.0]), torch.tensor([6.0, 2.0]),
        torch.tensor([20.0, 20.0]), torch.tensor([4.0, 4.0]), w_e=w_e)
    assert reward[0].item() == pytest.approx(5 * math.cos(1.5))
    assert reward[1].item() == pytest.approx(min(0.0, 2 * (math.cos(0.5) - 1) + w_e * 1.5 - 5))
    assert low.tolist() == [1.5, 0.5] and high.tolist() == [0.5, 1.5]
    # low beyond pi/2 is clamped: cos -> 0 for correct answers
    capped, _, _ = bingo_length_reward(torch.tensor([1]), torch.tensor([1.0]), torch.tensor([100.0]),
                                       torch.tensor([1.0]), torch.tensor([1.0]), w_e=w_e)
    assert capped.item() == pytest.approx(5 * math.cos(HALF_PI), abs=1e-12)


def test_wrong_answers_never_positive_and_early_reward_longer_significant_reasoning():
    w_e = 5 / HALF_PI
    n_sig = torch.tensor([10.0, 20.0, 31.0, 60.0])
    reward, _, _ = bingo_length_reward(torch.zeros(4), n_sig, torch.zeros(4), torch.full((4,), 20.0),
                                       torch.full((4,), 5.0), w_e=w_e)
    assert (reward <= 0).all()
    assert reward[0] < reward[1] < reward[2]  # early: more significant reasoning on hard questions is better
    assert reward[3].item() == 0.0  # capped at 0: a wrong answer never beats the correctness gap
    late, _, _ = bingo_length_reward(torch.zeros(4), n_sig, torch.zeros(4), torch.full((4,), 20.0),
                                     torch.full((4,), 5.0), w_e=-1.0)
    assert late[0] > late[1] > late[2] > late[3]  # after decay: brevity


def test_dynamic_schedule_decays_after_plateau():
    schedule = DynamicLengthSchedule(lambda_w_e=5.0, start_step=5, period=4, threshold=2.5, decay=0.5)
    initial = 5 / HALF_PI
    values = []
    for step in range(5):  # before start: constant
        values.append(schedule.update(step, torch.tensor([0.1 * step])))
    assert values == [pytest.approx(initial)] * 5
    for step in range(5, 9):  # accuracy still rising linearly: scaled slope equals the initial value
        values.append(schedule.update(step, torch.tensor([0.1 * step])))
    assert values[-1] == pytest.approx(initial)
    plateau = [schedule.update(step, torch.tensor([0.8])) for step in range(9, 30)]
    assert plateau[-1] == pytest.approx(-2 * 5 / HALF_PI)  # floored
    negative = [v for v in plateau if v < 0]
    assert negative[:3] == [pytest.approx(-0.5), pytest.approx(-1.0), pytest.approx(-1.5)]
    assert schedule.update(29, torch.tensor([0.9])) == plateau[-1]  # one update per step


def test_bingo_reward_uses_schedule_value_and_reports_it():
    bingo = BingoLengthReward(ExactLabelScorer(FILLER_SENTENCES), schedule_start_step=0)
    out, diag = bingo(None, [CORE, _with_filler(2)], None, [{"answer": "74"}] * 2, step=0, group_size=2,
                      components={"correctness": torch.tensor([0.0, 1.0])})
    assert diag["w_e"][0].item() == pytest.approx(5 / HALF_PI)
    state = bingo.schedule.state_dict()
    fresh = DynamicLengthSchedule()
    fresh.load_state_dict(state)
    assert fresh.value == bingo.schedule.value
