"""Reward workers: the run's reward functions (``rewards.build_reward(cfg.reward)``) in Ray actors of their own.

A model-based reward (Bingo's significance scorer) then loads and runs in its actor, never in the driver or a
trainer rank; math-verify keeps its time-limited child process inside the actor (rewards/correctness.py).

``RewardPool(n, reward_cfg)`` scores a batch like ``CombinedReward`` does (same call, same result): the batch is
cut into ``n`` shares of whole groups, one per worker. A worker that dies is replaced by a fresh actor that
gets the reward state as it was before the failed call, and only that share is scored again: every sample is
scored exactly once (results are placed by position). Stateful rewards (Bingo's dynamic length schedule, which
follows the accuracy of the whole batch) need one worker; their state is returned with every result, so the
driver can checkpoint it (``state_dict``) and restore it on resume (``load_state_dict``).

``submit_rollouts`` scores a generation that is still running: each worker is handed the generation's Ray object
refs and starts as soon as the rollouts exist, while the driver does other work (with ``rollout.async_steps=1``,
the policy update). Such a call is not retried: if a rollout or reward worker died, ``result`` raises and the
caller scores the (regenerated) rollouts with a plain call, which replaces a dead reward worker.

A reward function that fails (raises, returns NaN, hangs past its ``timeout_s``) stops the call with the
worker's ``RewardFunctionError`` (rewards/registry.py), unwrapped from Ray's error; a worker stuck where the in-worker
limit cannot reach (inside C code) is killed when the call's wait passes the sum of the components' limits plus a
minute, and the call raises ``RewardFunctionError`` naming the components.
"""

from __future__ import annotations

import ray
import torch

from train.workers.worker_shares import Shares


def reward_inputs(prompts, rollouts) -> tuple[list, list, list, list]:
    """The reward call's (prompts, responses, response_ids, metadata) for ``rollouts`` of ``prompts`` (Prompt
    objects, indexed by each rollout's ``prompt_index``); metadata = the prompt's meta + answer + truncated."""
    owners = [prompts[r.prompt_index] for r in rollouts]
    return ([p.text for p in owners], [r.response_text for r in rollouts], [r.response_ids for r in rollouts],
            [{**p.meta, "answer": p.answer, "truncated": r.truncated} for p, r in zip(owners, rollouts)])


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

    def score_rollouts(self, prompts, lo: int, hi: int, step: int, group_size: int, *shards):
        """Score samples [lo, hi) of the rollouts in ``shards`` (lists of Rollout, in prompt order: Ray hands
        them over once the generation has made them)."""
        rollouts = [r for shard in shards for r in shard][lo:hi]
        return self.score(*reward_inputs(prompts, rollouts), step, group_size)

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
        self._actor = ray.remote(RewardWorker).options(**(options or {"num_cpus": 0}))  # options: train/workers/placement.py
        self.reward_cfg, self.num_threads, self.max_restarts_per_call = reward_cfg, num_threads, max_restarts_per_call
        self.workers = [self._actor.remote(reward_cfg, num_threads) for _ in range(num_workers)]
        try:
            stateful = ray.get([w.ready.remote() for w in self.workers])
        except ray.exceptions.RayTaskError as err:  # a bad reward setting: its own error, without Ray's wrapping
            self.shutdown()
            raise err.cause from None
        if stateful[0] and num_workers > 1:
            self.shutdown()
            from train.run.config_checks import ConfigError

            raise ConfigError(
                f"rollout.reward_workers={num_workers}: a selected reward keeps state across steps (e.g. Bingo's "
                "dynamic length schedule, which follows the whole batch's accuracy); set rollout.reward_workers=1"
            )
        self.state: dict = {}
        self.restarts = 0
        self.timeout_s = call_timeout_s(reward_cfg)

    def _replace(self, index: int) -> None:
        worker = self._actor.remote(self.reward_cfg, self.num_threads)
        ray.get(worker.ready.remote())
        if self.state:
            ray.get(worker.load_state_dict.remote(self.state))
        self.workers[index] = worker
        self.restarts += 1

    def submit(self, prompts, responses, response_ids, metadata, *, step: int = 0, group_size: int = 1) -> "PendingScore":
        """Start scoring a batch (rollouts grouped by prompt, groups of ``group_size``); collect with ``.result()``."""
        columns = (prompts, responses, response_ids, metadata)

        def call(worker, lo, hi):
            return worker.score.remote(*[None if c is None else c[lo:hi] for c in columns], step, group_size)

        return PendingScore(self, len(responses), group_size, call, retry=True)

    def submit_rollouts(self, prompts, shard_refs: list, *, step: int, group_size: int) -> "PendingScore":
        """Score the ``group_size`` rollouts per prompt of ``prompts`` that a generation is still producing
        (``shard_refs``: its object refs in prompt order); see the module docstring."""

        def call(worker, lo, hi):
            return worker.score_rollouts.remote(prompts, lo, hi, step, group_size, *shard_refs)

        return PendingScore(self, len(prompts) * group_size, group_size, call, retry=False)

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


def call_timeout_s(reward_cfg: dict) -> float | None:
    """The longest a scoring call may take: the sum of the components' ``timeout_s`` (registry default when unset)
    plus 60 s for Ray; None when a component has no limit."""
    from rewards.registry import DEFAULT_TIMEOUT_S

    limits = [node.get("timeout_s", DEFAULT_TIMEOUT_S) if isinstance(node, dict) else DEFAULT_TIMEOUT_S
              for node in reward_cfg.values()]
    return None if any(limit is None for limit in limits) else float(sum(limits)) + 60.0


class PendingScore:
    """A batch being scored, each worker on a share of whole groups; ``call(worker, lo, hi)`` starts a share.
    ``retry``: a share whose worker died is scored again on a replacement."""

    def __init__(self, pool: RewardPool, batch: int, group_size: int, call, retry: bool):
        self.pool, self.retry = pool, retry
        self.shares = Shares(pool.workers, batch, group_size, call, pool._replace, pool.max_restarts_per_call,
                             "reward workers")

    def result(self):
        from rewards.registry import RewardFunctionError

        try:
            parts = self.shares.results(retry=self.retry, timeout_s=self.pool.timeout_s)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, (RewardFunctionError, ValueError, KeyError)):
                raise err.cause from None  # the reward's own one-line error, not Ray's traceback
            raise
        except TimeoutError as err:
            names = ", ".join(f"reward.{name}" for name in self.pool.reward_cfg)
            raise RewardFunctionError(f"{err}: one of {names} hangs inside code its timeout_s cannot interrupt; fix "
                                      "it or raise its timeout_s") from None
        total = torch.cat([p[0] for p in parts])
        components = {name: torch.cat([p[1][name] for p in parts]) for name in parts[0][1]}
        diagnostics = {}
        for name, first in parts[0][2].items():
            values = [p[2][name] for p in parts]
            diagnostics[name] = torch.cat(values) if isinstance(first, torch.Tensor) else [v for vs in values for v in vs]
        self.pool.state = parts[0][3]  # one worker when stateful (checked at start)
        return total, components, diagnostics
