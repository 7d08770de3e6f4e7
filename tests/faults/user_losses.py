"""A user policy objective that misbehaves, for tests/faults/test_nonfinite_steps.py (importable by `_target_` from
the trainer ranks: the test puts this folder on their path)."""


def nan_objective(*args, **kwargs):
    """The policy objective (algorithms/objective.py) with a NaN loss, as a diverged update gives."""
    from algorithms.objective import policy_objective

    loss, metrics = policy_objective(*args, **kwargs)
    return loss * float("nan"), metrics
