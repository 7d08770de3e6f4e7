"""Reward workers: the run's reward functions (``rewards.build_reward(cfg.reward)``) in Ray actors of their own.

A model-based reward (Bingo's significance scorer) then loads and runs in its actor, never in the driver or a
trainer rank; math-verify keeps its time-limited child process inside the actor (rewards/correctness.py).

``RewardPool(n, reward_cfg)`` scores a batch like ``CombinedReward`` does (same call, same result): the batch is
cut into ``n`` shares of whole groups, one per worker. A worker that dies is replaced by a fresh actor that
gets the reward state as it was before the failed call, and only that share is scored again: every sample is
scored exactly once (results are placed by position). Stateful rewards (Bingo's dynamic length schedule, which
follows the accuracy of the whole batch) need one worker; their state is returned with every result, so the
driver can checkpoint it (``state_dict``) and restore it on resume (``load_state_dict``).
"""

from __future__ import annotations

import ray
import torch


class RewardWorker:
    """One actor: a CombinedReward built from the config. Construction errors are kept and raised by ``ready``
    (with their own type and message), so a bad reward setting stops the run before any other actor starts."""

    def __init__(self, reward_cfg: dict, num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        from rewards.registry import build_reward

        self.reward_fn, self.error = None, None
        try:
            self.reward_fn = build_reward(reward_cfg)
        except Exception as err:  # noqa: BLE001 - re-raised by ready()
            self.error = err

    def ready(self) -> bool:
        """True when a component keeps state across steps (raises the construction error, if any)."""
        if self.error is not None:
            raise self.error
        return bool(self.reward_fn.state_dict())

    def score(self, prompts, responses, response_ids, metadata, step: int, group_size: int):
        total, components, diagnostics = self.reward_fn(prompts, responses, response_ids, metadata, step=step,
                                                        group_size=group_size)
        return total, components, diagnostics, self.reward_fn.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.reward_fn.load_state_dict(state)

    def close(self) -> None:
        self.reward_fn.close()


class RewardPool:
    """``num_workers`` RewardWorker actors; ``pool(prompts, responses, response_ids, metadata, step=, group_size=)``
    -> (total [B], components {name: [B]}, diagnostics), as ``CombinedReward``. ``restarts`` counts replaced workers."""

    def __init__(self, num_workers: int, reward_cfg: dict, options: dict | None = None, num_threads: int | None = None,
                 max_restarts_per_call: int = 3):
        if num_workers < 1:
            raise ValueError(f"rollout.reward_workers={num_workers}: a RewardPool needs at least one worker")
        self._actor = ray.remote(RewardWorker).options(**(options or {"num_cpus": 0}))  # options: train/placement.py
        self.reward_cfg, self.num_threads, self.max_restarts_per_call = reward_cfg, num_threads, max_restarts_per_call
        self.workers = [self._actor.remote(reward_cfg, num_threads) for _ in range(num_workers)]
        try:
            stateful = ray.get([w.ready.remote() for w in self.workers])
        except ray.exceptions.RayTaskError as err:  # a bad reward setting: its own error, without Ray's wrapping
            self.shutdown()
            raise err.cause from None
        if stateful[0] and num_workers > 1:
            self.shutdown()
            from train.config_checks import ConfigError

            raise ConfigError(
                f"rollout.reward_workers={num_workers}: a selected reward keeps state across steps (e.g. Bingo's "
                "dynamic length schedule, which follows the whole batch's accuracy); set rollout.reward_workers=1"
            )
        self.state: dict = {}
        self.restarts = 0

    def _replace(self, index: int) -> None:
        worker = self._actor.remote(self.reward_cfg, self.num_threads)
        ray.get(worker.ready.remote())
        if self.state:
            ray.get(worker.load_state_dict.remote(self.state))
        self.workers[index] = worker
        self.restarts += 1

    def submit(self, prompts, responses, response_ids, metadata, *, step: int = 0, group_size: int = 1) -> "PendingScore":
        """Start scoring a batch (rollouts grouped by prompt, groups of ``group_size``); collect with ``.result()``."""
        return PendingScore(self, (prompts, responses, response_ids, metadata), step, group_size)

    def __call__(self, prompts, responses, response_ids, metadata, *, step: int = 0, group_size: int = 1):
        return self.submit(prompts, responses, response_ids, metadata, step=step, group_size=group_size).result()

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state or {})
        if self.state:
            ray.get([w.load_state_dict.remote(self.state) for w in self.workers])

    def close(self) -> None:
        ray.get([w.close.remote() for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)


class PendingScore:
    """A batch being scored: worker i got the groups in ``todo[i]`` = (first sample, end sample)."""

    def __init__(self, pool: RewardPool, columns: tuple, step: int, group_size: int):
        self.pool, self.columns, self.step, self.group_size = pool, columns, step, group_size
        batch = len(columns[1])
        if batch % group_size:
            raise ValueError(f"reward: batch {batch} is not a whole number of groups of {group_size}")
        groups, n = batch // group_size, len(pool.workers)
        bounds = [(groups * i // n * group_size, groups * (i + 1) // n * group_size) for i in range(n)]
        self.todo = {i: b for i, b in enumerate(bounds) if b[1] > b[0]}
        self.refs = self._launch()

    def _launch(self) -> dict:
        refs = {}
        for i, (lo, hi) in self.todo.items():
            share = [None if column is None else column[lo:hi] for column in self.columns]
            refs[self.pool.workers[i].score.remote(*share, self.step, self.group_size)] = i
        return refs

    def result(self):
        done: dict[int, tuple] = {}
        failures = 0
        while self.todo:
            for ref, i in self.refs.items():
                try:
                    done[self.todo[i][0]] = ray.get(ref)
                    del self.todo[i]
                except ray.exceptions.RayActorError:
                    failures += 1
                    if failures > self.pool.max_restarts_per_call:
                        raise RuntimeError(f"reward workers died {failures} times scoring one batch; giving up") from None
                    self.pool._replace(i)  # its share stays in `todo` and is scored again by the replacement
            self.refs = self._launch()
        parts = [done[lo] for lo in sorted(done)]
        total = torch.cat([p[0] for p in parts])
        components = {name: torch.cat([p[1][name] for p in parts]) for name in parts[0][1]}
        diagnostics = {}
        for name, first in parts[0][2].items():
            values = [p[2][name] for p in parts]
            diagnostics[name] = torch.cat(values) if isinstance(first, torch.Tensor) else [v for vs in values for v in vs]
        self.pool.state = parts[0][3]  # one worker when stateful (checked at start)
        return total, components, diagnostics
