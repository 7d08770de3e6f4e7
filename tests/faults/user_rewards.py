"""User reward functions that misbehave, for tests/faults/test_reward_faults.py (importable by `_target_` from a reward
worker: the test puts this folder on the workers' path)."""

import time

import torch


def fails_on_third(prompts, responses, response_ids, metadata, **context):
    """Raises on the response 'r2' only (as a user's parser on one odd sample)."""
    return torch.tensor([1.0 / (0 if r == "r2" else 1) for r in responses])


def nan_on_second(prompts, responses, response_ids, metadata, **context):
    return torch.tensor([float("nan") if i == 1 else 1.0 for i in range(len(responses))])


def one_value_short(prompts, responses, response_ids, metadata, **context):
    return torch.ones(len(responses) - 1)


def text_values(prompts, responses, response_ids, metadata, **context):
    return ["good" for _ in responses]


def hangs(prompts, responses, response_ids, metadata, **context):
    while True:  # a user's loop that never ends
        time.sleep(0.01)


def swallows_everything(prompts, responses, response_ids, metadata, **context):
    """Hangs and catches every Exception: the time limit must still stop it."""
    while True:
        try:
            time.sleep(0.01)
        except Exception:  # noqa: BLE001 - the misbehaviour under test
            pass


def ones(prompts, responses, response_ids, metadata, **context):
    return torch.ones(len(responses))


def fails_from_second_step(prompts, responses, response_ids, metadata, *, step, **context):
    """Scores 1 at the first RL step (step 0), then raises (a user's bug hit mid-run)."""
    if step >= 1:
        raise KeyError("difficulty")
    return torch.ones(len(responses))
