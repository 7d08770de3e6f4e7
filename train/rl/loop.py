"""The RL loop: steps, periodic held-out evaluation and checkpoints. ``RLLoop.step`` is the algorithm:

    batch = rounds.next(step) -> pack updates -> (pi_old / reference log-probs, when needed) -> KL into the
    reward (when so configured) -> advantages -> policy update -> weight sync -> metrics

Each part lives in a file named for it (train/rl/): rounds, update_batches, logprobs, algorithm, policy_update,
weight_sync, step_metrics, checkpointing.
"""

from __future__ import annotations

from typing import Callable

from tqdm import tqdm

from train.models.evaluate import evaluate_on_pool
from train.models.sequence_parallel import data_parallel_size, sp_size
from train.rl.checkpointing import RLCheckpoints
from train.rl.logprobs import record_logprobs
from train.rl.policy_update import update_policy
from train.rl.rounds import Rounds
from train.rl.step_metrics import PhaseTimer, sample_table, skipped_step_metrics, step_metrics
from train.rl.update_batches import pack_updates
from train.rl.weight_sync import WeightSync
from train.workers.ray_session import object_refs_held
from train.workers.run_stops import BadSteps


class RLLoop:
    """State of a run between steps. ``on_step(step, metrics)``: called after each step's metrics are logged
    (tests and benchmarks hook in here: per-step timing, early stops)."""

    def __init__(self, cfg, setup, actors, logger, hf_model, on_step: Callable[[int, dict], None] | None = None):
        self.cfg, self.setup, self.actors, self.logger, self.hf_model = cfg, setup, actors, logger, hf_model
        self.t_cfg, self.r_cfg, self.algorithm = cfg.trainer, cfg.rollout, setup.algorithm
        self.on_step = on_step
        self.timer = PhaseTimer()
        self.rounds = Rounds(setup.sampler, actors.rollout_pool, actors.momentum_pool, actors.rewards,
                             actors.rewards_in_workers, setup.algorithm, setup.tokenizer, cfg.rollout, cfg.seed,
                             cfg.trainer.max_steps, self.timer)
        self.weight_sync = WeightSync(actors.rollout_pool, actors.momentum_pool, setup.algorithm.momentum_update,
                                      setup.model_path)
        self.checkpoints = RLCheckpoints(cfg.run_dir, hf_model, setup.tokenizer, cfg.algorithm.name, cfg.trainer.keep_last,
                                         actors, self.rounds, self.weight_sync)
        # one share per data-parallel group: the trainer.sequence_parallel_size ranks of a group take the same one;
        # trainer.max_tokens_per_micro_batch: each mini-batch gets the multiple of the groups its tokens need
        self.data_parallel = data_parallel_size(self.t_cfg.world_size, sp_size(self.t_cfg))
        self.max_tokens = self.t_cfg.get("max_tokens_per_micro_batch")
        self.micro_batches = self.data_parallel * (1 if self.max_tokens else self.t_cfg.micro_batches_per_rank)
        self.step_count, self.weights, self.history = 0, None, []
        self.bad_steps = BadSteps(self.t_cfg.get("max_bad_steps", 3))  # skipped (non-finite) steps in a row

    # -- one step ------------------------------------------------------------------------------------------------
    def step(self) -> dict:
        """One RL step; returns its metrics, logged at step + 1 (the update's weights are kept in ``self.weights``)."""
        self.timer.reset()
        algorithm, trainer, step = self.algorithm, self.actors.trainer, self.step_count
        batch = self.rounds.next(step)
        if len(batch.rollouts) < self.micro_batches:  # every group was dropped: nothing to learn from this step
            trainer.advance_lr_schedule()
            metrics = skipped_step_metrics(batch)
            self.logger.log(metrics, step + 1)
            return metrics
        updates = pack_updates(batch.rollouts, self.micro_batches, int(self.t_cfg.get("ppo_mini_batches", 1)),
                               share_prompt=self.setup.share_prompt, group_size=algorithm.group_size,
                               row_tokens=self.t_cfg.row_tokens, attn_backend=self.cfg.model.attn_backend,
                               pad_token_id=self.setup.tokenizer.pad_token_id, mask_truncated=algorithm.mask_truncated,
                               max_tokens=self.max_tokens)
        optimizer_steps = self.t_cfg.ppo_epochs * len(updates)
        logprobs = record_logprobs(trainer, self.actors.reference, updates,
                                   algorithm.needs_old_logprobs(optimizer_steps), self.timer)
        rewards = algorithm.kl_into_rewards(batch.rewards, updates, logprobs)
        advantages = algorithm.step_advantages(rewards, batch)  # [num_rollouts]
        with self.timer("update"):
            stats = update_policy(trainer, algorithm, updates, advantages, logprobs, self.t_cfg.ppo_epochs, batch.rollouts)
            lr = trainer.advance_lr_schedule()
        self.rounds.finish_prefetch()
        with self.timer("weight_sync"):
            self.weights = trainer.full_state_dict()
            self.weight_sync(self.weights, step + 1)
        metrics = step_metrics(step + 1, batch, rewards, advantages, stats, optimizer_steps=optimizer_steps,
                               world_size=self.data_parallel,
                               micro_batches=self.t_cfg.ppo_epochs * sum(len(u.micro) for u in updates),
                               lr=lr, tokens=sum(u.tokens for u in updates), seconds=self.timer.seconds,
                               worker_restarts=self.actors.rollout_pool.restarts, kl_in_reward=algorithm.kl_reward is not None)
        metrics["train/skipped_steps"] = stats.get("skipped", 0.0) / self.data_parallel  # non-finite, not applied
        metrics["perf/ray_object_refs"] = object_refs_held()  # flat unless refs leak (bench/faults.py soak)
        if hasattr(self.setup.sampler, "metrics"):
            metrics.update(self.setup.sampler.metrics())
        self.logger.log(metrics, step + 1)
        if self.logger.samples_due(step + 1) or step == 0:
            self.logger.log_samples("rollout/samples", sample_table(batch.owners, batch.rollouts, rewards, batch.components), step + 1)
            self.logger.log_histogram("rollout/response_length_hist", [float(len(r.response_ids)) for r in batch.rollouts], step + 1)
        return metrics

    # -- the run ---------------------------------------------------------------------------------------------------
    def run(self, resume_from) -> dict:
        t_cfg = self.t_cfg
        if resume_from is not None:
            self.step_count = self.checkpoints.resume(resume_from)
        initial_eval = self.evaluate() if t_cfg.eval_at_start and self.step_count == 0 else {}
        progress = tqdm(total=t_cfg.max_steps, initial=self.step_count, desc=f"rl:{self.cfg.algorithm.name}", dynamic_ncols=True)
        try:
            while self.step_count < t_cfg.max_steps:
                metrics = self.step()
                self.step_count += 1
                step = self.step_count
                progress.update(1)
                if self.on_step is not None:
                    self.on_step(step, metrics)
                if "train/skipped_update" in metrics:
                    continue
                self.bad_steps.record(step, metrics["train/skipped_steps"])
                self.history.append(metrics)
                progress.set_postfix(reward=f"{metrics['reward/total']:.3f}", len=f"{metrics['rollout/response_length_mean']:.0f}")
                if t_cfg.eval_every and step % t_cfg.eval_every == 0 and step < t_cfg.max_steps:
                    self.evaluate()
                if t_cfg.save_every and step % t_cfg.save_every == 0 and step < t_cfg.max_steps:
                    self.checkpoints.save(step, self.weights)
        finally:
            progress.close()
        weights = self.weights if self.weights is not None else self.actors.trainer.full_state_dict()
        eval_result = self.evaluate()
        final = self.checkpoints.save(self.step_count, weights)
        return {"step": self.step_count, "history": self.history, "checkpoint": str(final), "initial_eval": initial_eval,
                **{k: v for k, v in eval_result.items() if k.startswith("eval/")}}

    def evaluate(self) -> dict:
        """Held-out accuracy (greedy, and sampled when ``rollout.eval_samples``) of the current policy, generated by
        the rollout workers (on their devices, in the rollout precision): they hold its weights, synced after every
        update and at resume, and the initial ones at step 0. The completions are scored here (math-verify)."""
        if not self.setup.eval_rows:
            return {}
        r_cfg = self.r_cfg
        result = evaluate_on_pool(self.actors.rollout_pool, self.setup.tokenizer, self.setup.eval_rows, r_cfg.max_new_tokens,
                                  r_cfg.batch_size, samples=int(r_cfg.get("eval_samples", 0)), temperature=r_cfg.temperature,
                                  top_p=r_cfg.top_p, seed=self.cfg.seed)
        self.logger.log_samples("eval/samples", result.pop("samples"), self.step_count)
        self.logger.log(result, self.step_count)
        return result
