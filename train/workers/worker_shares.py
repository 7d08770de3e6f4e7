"""One call split over a pool of Ray actors in contiguous shares, with dead workers replaced.

The rollout pool (train/workers/actors.py) and the reward pool (train/workers/reward_workers.py) both hand each worker a
contiguous share of a batch; a share whose worker died (``ray.exceptions.RayActorError``) runs again on a
replacement worker, so nothing is lost and nothing is done twice.
"""

from __future__ import annotations

import time

import ray


class Shares:
    """``total`` items cut into ``len(workers)`` contiguous shares of whole ``unit``s (empty shares are skipped);
    ``call(worker, lo, hi)`` starts share [lo, hi) on a worker and returns its object ref.

    ``replace(i)`` puts a fresh worker at ``workers[i]`` (the pool's own list, so the relaunch sees it);
    ``max_restarts`` bounds the replacements per call, ``what`` names the workers in the error."""

    def __init__(self, workers: list, total: int, unit: int, call, replace, max_restarts: int, what: str):
        if total % unit:
            raise ValueError(f"{what}: batch {total} is not a whole number of groups of {unit}")
        units, n = total // unit, len(workers)
        bounds = [(units * i // n * unit, units * (i + 1) // n * unit) for i in range(n)]
        self.todo = {i: b for i, b in enumerate(bounds) if b[1] > b[0]}  # worker -> share still to be collected
        self.bounds = dict(self.todo)
        self.workers, self.call, self.replace, self.max_restarts, self.what = workers, call, replace, max_restarts, what
        self.refs = self.first_refs = self._launch()

    def _launch(self) -> dict:
        return {self.call(self.workers[i], lo, hi): i for i, (lo, hi) in self.todo.items()}

    def first_refs_in_order(self) -> list:
        """The object refs of the shares as first launched, in batch order."""
        return [ref for ref, i in sorted(self.first_refs.items(), key=lambda item: self.bounds[item[1]][0])]

    def results(self, retry: bool = True, timeout_s: float | None = None) -> list:
        """Every share's result, in batch order. ``retry``: a share whose worker died runs again on a replacement
        (at most ``max_restarts`` times in all); otherwise the RayActorError propagates. ``timeout_s``: a wait for
        the whole call longer than this kills the workers still busy (replaced for the next call) and raises
        ``TimeoutError``; None waits without limit."""
        done: dict[int, object] = {}
        failures = 0
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.todo:
            for ref, i in self.refs.items():
                try:
                    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                    done[self.todo[i][0]] = ray.get(ref, timeout=remaining)
                    del self.todo[i]
                except ray.exceptions.GetTimeoutError:
                    busy = ", ".join(str(i) for i in sorted(self.todo))
                    self._give_up_on_busy_workers()
                    raise TimeoutError(f"{self.what} {busy}: no result within {timeout_s:g} s; the busy workers were "
                                       "stopped (replaced for the next call)") from None
                except ray.exceptions.RayActorError:
                    if not retry:
                        raise
                    failures += 1
                    if failures > self.max_restarts:
                        raise RuntimeError(f"{self.what} died {failures} times in one call; giving up") from None
                    self.replace(i)  # its share stays in `todo` and runs again on the replacement
            self.refs = self._launch()
        return [done[lo] for lo in sorted(done)]

    def _give_up_on_busy_workers(self) -> None:
        for i in list(self.todo):
            ray.kill(self.workers[i])
            self.replace(i)
