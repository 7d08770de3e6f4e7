"""Ray actors with one job each. This file holds the policy trainer group; the driver (the RL recipe) talks
to the group as if it were one trainer."""

from __future__ import annotations

import time
import uuid

import ray

from train.models import sequence_parallel
from train.workers.placement import device_of
from train.workers.policy_trainer import PolicyTrainer
from train.workers.worker_shares import Shares


class TrainerFailure(RuntimeError):
    """A policy-trainer rank died or raised. Its torch.distributed world cannot continue without it (the other
    ranks would wait in a collective), so the run must stop; it resumes from the last checkpoint."""


class ActorTimeout(TrainerFailure):
    """An actor (trainer rank, rollout worker) gave no answer within ``cluster.actor_timeout_s``: stuck in a
    collective, a lost node, a dead GPU. The run stops as for a failed rank (the recipes name the last good
    checkpoint and the resume command) instead of waiting for ever."""


def wait_all(refs: list, who: list[str], what: str, timeout_s: float | None) -> list:
    """``ray.get(refs)`` within ``timeout_s`` seconds (None: no limit); past it, ``ActorTimeout`` names the actors
    (``who[i]`` made ``refs[i]``) still busy with ``what``."""
    if timeout_s is not None:
        _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        if pending:
            busy = [who[i] for i, ref in enumerate(refs) if ref in pending]
            raise ActorTimeout(f"{', '.join(busy)} gave no answer to {what} within cluster.actor_timeout_s={timeout_s:g} s")
    return ray.get(list(refs))


class TrainerGroup:
    """``world_size`` PolicyTrainer actors forming one torch.distributed world (rank 0 holds full weights).

    Rendezvous: rank 0 opens the world's store on a free port of its own node and returns its Ray node address and
    the port (``rendezvous``); every rank then joins there. So the ranks may run on any nodes (``rank_options``:
    Ray options per rank, train/workers/placement.py), and ``connections`` records, per rank, its node address and
    the store address it joined.

    Actors are named ``policy_trainer_<group>_<rank>`` (visible in ``ray list actors``). Every call waits for
    the ranks one at a time, so the failure of any rank surfaces at once as a ``TrainerFailure`` instead of
    leaving the driver blocked on a surviving rank stuck in a collective; a call that takes longer than
    ``timeout_s`` (``cluster.actor_timeout_s``; None: no limit) raises ``ActorTimeout`` naming the ranks still busy.
    """

    def __init__(self, world_size: int, model_path: str, attn_backend: str, trainer_cfg: dict,
                 micro_batches_per_rank: int, seed: int = 0, rank_options: list[dict] | None = None,
                 num_threads: int | None = None, timeout_s: float | None = None):
        self.world_size, self.timeout_s = world_size, timeout_s
        # trainer.sequence_parallel_size: the SP ranks of a group take the same micro-batches (train/models/sequence_parallel.py)
        self.sp = sequence_parallel.sp_size(trainer_cfg)
        self.data_parallel = sequence_parallel.data_parallel_size(world_size, self.sp)
        rank_options = rank_options or [{"num_cpus": 1}] * world_size
        actor, group = ray.remote(PolicyTrainer), uuid.uuid4().hex[:8]
        self.names = [f"policy_trainer_{group}_{rank}" for rank in range(world_size)]
        # the actors start together; only the rendezvous waits for rank 0
        self.ranks = [
            actor.options(name=self.names[rank], **rank_options[rank]).remote(
                rank, world_size, model_path, attn_backend, dict(trainer_cfg), micro_batches_per_rank, seed, num_threads)
            for rank in range(world_size)
        ]
        try:
            address, port = self._get([self.ranks[0].open_rendezvous.remote()], "the rendezvous")[0]
            self.rendezvous = (address, port)  # rank 0's node address and store port
            self.connections: list[dict] = self._get([r.join.remote(address, port) for r in self.ranks], "start-up")
        except TrainerFailure:
            self.shutdown()
            raise

    def _get(self, refs: list, what: str) -> list:
        """The results of ``refs`` (``refs[r]`` made by rank r: every rank, or rank 0 alone), failing fast."""
        pending = list(refs)
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
            if not ready:
                busy = [f"rank {r} ({self.names[r]})" for r, ref in enumerate(refs) if ref in pending]
                raise ActorTimeout(f"policy trainer {', '.join(busy)} gave no answer to {what} within "
                                   f"cluster.actor_timeout_s={self.timeout_s:g} s")
            try:
                ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                lines = [line for line in str(err).splitlines() if line.strip()]
                cause = f"{lines[0]} ... {lines[-1]}" if len(lines) > 1 else (lines[0] if lines else "")
                raise TrainerFailure(f"a policy trainer rank failed during {what}: {type(err).__name__}: {cause}") from err
        return ray.get(list(refs))

    def shard(self, items: list) -> list[list]:
        """Contiguous split of ``items`` over the data-parallel groups (equal counts required by DeepSpeed), one list
        per rank: the ranks of an SP group get the same share."""
        if len(items) % self.data_parallel:
            raise ValueError(f"{len(items)} micro-batches do not split evenly over {self.data_parallel} data-parallel "
                             f"trainer groups (trainer.world_size / trainer.sequence_parallel_size)")
        n = len(items) // self.data_parallel
        return [items[(r // self.sp) * n : (r // self.sp + 1) * n] for r in range(self.world_size)]

    def _one_per_group(self, results: list) -> list:
        """The results of the first rank of each SP group (its other ranks return the same whole-row numbers)."""
        return results[:: self.sp]

    def train_step(self, batches: list, loss_fn, extras: list[dict], keep_gradients: bool = False) -> list[dict]:
        return self._one_per_group(self._get([
            rank.train_step.remote(b, loss_fn, e, keep_gradients)
            for rank, b, e in zip(self.ranks, self.shard(batches), self.shard(extras))
        ], "the policy update"))

    def logprobs(self, batches: list) -> list:
        shards = self._get([rank.logprobs.remote(b) for rank, b in zip(self.ranks, self.shard(batches))], "log-probs")
        return [lp for shard in self._one_per_group(shards) for lp in shard]

    def gradients(self) -> dict:
        """The full gradient of the last ``train_step(..., keep_gradients=True)``, as reduced over the ranks."""
        return self._get([rank.gradients.remote() for rank in self.ranks], "gradients")[0]

    def full_state_dict(self) -> dict:
        return self._get([rank.full_state_dict.remote() for rank in self.ranks], "weight gathering")[0]

    def save_state(self, path: str) -> None:
        self._get([rank.save_state.remote(path) for rank in self.ranks], "checkpointing")

    def load_state(self, path: str, step: int) -> None:
        self._get([rank.load_state.remote(path, step) for rank in self.ranks], "resume")

    def advance_lr_schedule(self) -> float:
        """End of an RL step: every rank's schedule moves on; returns the lr the step used."""
        return self._get([rank.advance_lr_schedule.remote() for rank in self.ranks], "the lr schedule")[0]

    def start_lr_schedule(self, **schedule) -> float:
        """Every rank replaces its lr schedule (``PolicyTrainer.start_lr_schedule``); returns the next step's lr."""
        return self._get([rank.start_lr_schedule.remote(**schedule) for rank in self.ranks], "the lr schedule")[0]

    def lr_schedule_state(self) -> dict:
        return self._get([self.ranks[0].lr_schedule_state.remote()], "the lr schedule")[0]

    def apply_to_model(self, fn) -> object:
        """``fn(module)`` on every rank's model; rank 0's result."""
        return self._get([rank.apply_to_model.remote(fn) for rank in self.ranks], "a model change")[0]

    def shutdown(self) -> None:
        for rank in self.ranks:
            ray.kill(rank)


class RolloutPool:
    """``num_workers`` RolloutWorker actors sharing the prompts of a step.

    A worker that dies mid-step is replaced by a fresh actor with the current weights, and its unfinished
    prompts are generated again there: every prompt is answered exactly once per step (results are keyed by
    prompt index), and the replacement is counted in ``restarts``.

    ``submit`` starts a generation and returns at once (the driver overlaps it with the policy update when
    ``rollout.async_steps=1``); ``generate`` is ``submit(...).result()``. A weight sync sent while a generation
    runs is queued behind it by Ray (actor calls run in order), so that generation keeps the weights it started with.

    Every wait on the workers is limited to ``timeout_s`` (``cluster.actor_timeout_s``; None: no limit): past it,
    ``ActorTimeout`` names the workers still busy and the call (a stuck generation's workers are killed first).
    """

    def __init__(self, num_workers: int, model_path: str, seed: int = 0, worker_options: list[dict] | None = None,
                 max_restarts_per_step: int = 3, backend: str = "hf", num_threads: int | None = None,
                 precision: str = "auto", vllm_settings: dict | None = None, timeout_s: float | None = None):
        self.timeout_s = timeout_s
        # Ray options per worker (train/workers/placement.py); a replacement worker gets the options of the one it replaces
        self.worker_options = worker_options or [{"num_cpus": 1}] * num_workers
        if len(self.worker_options) != num_workers:
            raise ValueError(f"{len(self.worker_options)} worker options for {num_workers} rollout workers")
        if backend == "vllm":
            from train.workers.vllm_worker import VLLMRolloutWorker as worker_class

            # rollout.vllm.* keys and trainer.precision (train/workers/vllm_worker.py ``vllm_settings``)
            self._worker_kwargs = {"settings": dict(vllm_settings or {}), "precision": precision}
        elif backend == "hf":
            from train.workers.rollout_worker import RolloutWorker as worker_class

            self._worker_kwargs = {"device": device_of(self.worker_options[0]), "num_threads": num_threads,
                                   "precision": precision}
        else:
            raise ValueError(f"rollout.backend={backend!r} must be hf or vllm")
        self._actor = ray.remote(worker_class)
        self.model_path, self.seed, self.max_restarts_per_step = model_path, seed, max_restarts_per_step
        self.workers = [self._start(i) for i in range(num_workers)]
        self.weights_ref, self.version, self.restarts = None, 0, 0
        self.broadcast = None  # (TrainerGroup, backend) when trainer rank 0 broadcasts the weights (use_broadcast)
        self.state_dict, self.specs = None, None

    def _start(self, index: int):
        return self._actor.options(**self.worker_options[index]).remote(self.model_path, self.seed + index, **self._worker_kwargs)

    def _replace(self, index: int) -> None:
        worker = self._start(index)
        if self.weights_ref is None and self.state_dict is not None:  # broadcast mode: this once, the object store
            self.weights_ref = ray.put(self.state_dict)
        if self.weights_ref is not None:
            wait_all([worker.load_weights.remote(self.weights_ref, self.version)], [f"rollout worker {index} (a replacement)"],
                     "loading the weights", self.timeout_s)
        self.workers[index] = worker
        self.specs = None  # the new worker is no member of the broadcast group: the next sync forms it again
        self.restarts += 1

    def use_broadcast(self, trainer, backend: str) -> None:
        """From now on ``sync`` has trainer rank 0 broadcast its weights to the workers (``backend`` nccl or gloo,
        train/workers/weight_broadcast.py) instead of sending ``state_dict`` through the object store."""
        self.broadcast, self.specs = (trainer, backend), None

    def _form_group(self) -> None:
        from train.workers.weight_broadcast import (
            trainer_join,
            trainer_open,
            trainer_specs,
        )

        trainer, backend = self.broadcast
        rank0, size = trainer.ranks[0], 1 + len(self.workers)
        what = "forming the weight-broadcast group"
        address, port = wait_all([rank0.__ray_call__.remote(trainer_open)], ["policy trainer rank 0"], what, self.timeout_s)[0]
        wait_all([r.__ray_call__.remote(trainer_join, backend, address, port, size) for r in trainer.ranks]
                 + [w.join_weight_group.remote(backend, address, port, j + 1, size) for j, w in enumerate(self.workers)],
                 self._who(trainer), what, self.timeout_s)
        self.specs = wait_all([rank0.__ray_call__.remote(trainer_specs)], ["policy trainer rank 0"], what, self.timeout_s)[0]

    def _who(self, trainer=None) -> list[str]:
        """Names of the actors of a weight sync, in call order: the trainer ranks (broadcast only), then the workers."""
        ranks = [f"policy trainer rank {r}" for r in range(len(trainer.ranks))] if trainer is not None else []
        return ranks + [f"rollout worker {i}" for i in range(len(self.workers))]

    def sync(self, state_dict: dict, version: int) -> None:
        """Weight sync: put the weights in the object store once; every worker loads that version. With
        ``use_broadcast``, trainer rank 0 broadcasts its current weights instead (``state_dict`` must be those, as
        ``TrainerGroup.full_state_dict()`` returns them; it is kept only for a replacement worker)."""
        self.version = version
        if self.broadcast is None:
            self.weights_ref = ray.put(state_dict)
            wait_all([w.load_weights.remote(self.weights_ref, version) for w in self.workers], self._who(),
                     f"the weight sync to version {version}", self.timeout_s)
            return
        from train.workers.weight_broadcast import trainer_send

        if self.specs is None:
            self._form_group()
        self.state_dict, self.weights_ref = state_dict, None
        trainer = self.broadcast[0]
        wait_all([r.__ray_call__.remote(trainer_send) for r in trainer.ranks]
                 + [w.receive_weights.remote(self.specs, version) for w in self.workers], self._who(trainer),
                 f"the weight broadcast of version {version}", self.timeout_s)

    def submit(self, prompts: list, group_size: int, seed: int, **sampling) -> PendingGeneration:
        """Start generating ``group_size`` responses to each of ``prompts``; collect with ``.result()``."""
        return PendingGeneration(self, prompts, group_size, seed, sampling)

    def generate(self, prompts: list, group_size: int, seed: int, **sampling) -> list:
        """All rollouts of ``prompts`` (group_size each), grouped by prompt in prompt order."""
        return self.submit(prompts, group_size, seed, **sampling).result()

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)


class PendingGeneration:
    """A generation running on the pool's workers: each worker got a contiguous share of the prompts."""

    def __init__(self, pool: RolloutPool, prompts: list, group_size: int, seed: int, sampling: dict):
        def call(worker, lo, hi):
            return worker.generate.remote(prompts[lo:hi], group_size, seed=seed + lo, prompt_offset=lo, **sampling)

        self.shares = Shares(pool.workers, len(prompts), 1, call, pool._replace, pool.max_restarts_per_step,
                             "rollout workers")
        self.timeout_s, self.count = pool.timeout_s, len(prompts)
        self.rollouts: list | None = None

    def shard_refs(self) -> list:
        """The object refs of the shares as first launched, in prompt order (for work that starts as soon as they
        are ready, e.g. reward scoring: train/workers/reward_workers.py)."""
        return self.shares.first_refs_in_order()

    def result(self) -> list:
        """Wait for every share; a share whose worker died runs again on a replacement worker. Past the pool's
        ``timeout_s`` the busy workers are killed (replaced) and ``ActorTimeout`` stops the run."""
        if self.rollouts is None:
            try:
                shares = self.shares.results(timeout_s=self.timeout_s)
            except TimeoutError as err:
                raise ActorTimeout(f"{err} while generating the rollouts of {self.count} prompts "
                                   "(cluster.actor_timeout_s)") from None
            self.rollouts = [r for share in shares for r in share]
        return self.rollouts
