"""How a run stops on a trainer failure, for both recipes: the count of skipped (non-finite) steps in a row that
ends a run after ``trainer.max_bad_steps``, and the message naming the last good checkpoint and the resume command.

The trainer ranks skip an optimizer step whose loss or gradient is not finite on any rank
(train/workers/policy_trainer.py ``train_step``: weights, optimizer state, version and lr stay as they were); the
step is logged with ``train/skipped_steps``. One such step is a glitch; several in a row mean the run diverged
(or the data or the loss is broken), and training on would only skip every step.
"""

from __future__ import annotations

from pathlib import Path

from train.run import checkpoint
from train.workers.actors import TrainerFailure


class NonFiniteSteps(TrainerFailure):
    """``trainer.max_bad_steps`` steps in a row were skipped: the run stops (a TrainerFailure, so it prints one line)."""


class BadSteps:
    """Consecutive steps with a skipped optimizer step; ``record`` raises ``NonFiniteSteps`` at ``max_bad_steps``
    in a row (None: never)."""

    def __init__(self, max_bad_steps: int | None):
        self.max_bad_steps, self.in_a_row, self.first = max_bad_steps, 0, None

    def record(self, step: int, skipped: float) -> None:
        """After ``step`` (1-based) with ``skipped`` optimizer steps skipped."""
        if not skipped:
            self.in_a_row, self.first = 0, None
            return
        self.in_a_row += 1
        self.first = self.first or step
        if self.max_bad_steps is not None and self.in_a_row >= self.max_bad_steps:
            raise NonFiniteSteps(
                f"trainer.max_bad_steps={self.max_bad_steps}: steps {self.first}-{step} in a row had a non-finite loss "
                "or gradient and were skipped (weights unchanged); lower trainer.lr, check the data and the loss, or "
                "raise trainer.max_bad_steps")


def stopped_at(step_count: int | None, run_dir: Path) -> str:
    """Where a failed run stands: its last finished step (None: it stopped while starting) and its last good
    checkpoint."""
    last = checkpoint.latest(run_dir)
    where = "during start-up" if step_count is None else f"after step {step_count}"
    return f"The run stopped {where}; the last good checkpoint is {last if last else 'none (no checkpoint was saved yet)'}."


def stop_message(err: BaseException, step_count: int | None, run_dir: Path, fix: str = "Fix the cause") -> str:
    """``err``'s message, where the run stopped, and how to continue (``fix``, then the same command with
    trainer.resume=auto)."""
    logs = (" (the trainer rank's own log is in Ray's session logs, /tmp/ray/session_latest/logs/worker-*.err)"
            if isinstance(err, TrainerFailure) and not isinstance(err, NonFiniteSteps) else "")
    return (f"{err}. {stopped_at(step_count, run_dir)} {fix}{logs}, then rerun the same command with "
            f"run_dir={run_dir} and trainer.resume=auto to continue from it.")
