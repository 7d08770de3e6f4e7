"""RL recipe (GRPO family, AAPO): the driver loop, as data flow between Ray actors.

    prompts -> rollouts (RolloutPool) -> rewards (RewardPool) -> (reference log-probs) -> advantages
            -> policy update (TrainerGroup, DeepSpeed ZeRO) -> weight sync -> rollouts ...

With ``rollout.async_steps=1`` the rollouts of step k+1 are generated (by the weights before update k) while
update k runs, as verl's one-step off-policy mode: generation leaves the critical path and every sample is one
policy version old (``rollout/staleness``); pi_old in the clipped ratio is the policy at the update, as when
verl recomputes old log-probs on the actor.

The math lives in algorithms/ and rewards/ (instantiated from cfg.algorithm / cfg.reward); distribution lives
in the actors (train/workers/actors.py, train/workers/reward_workers.py; where they run: train/workers/placement.py); how a step's
rollouts become optimizer steps: train/rl/update_batches.py. This file only orchestrates.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import AutoConfig
from tqdm import tqdm

from data_pipelines.loading import load_split
from data_pipelines.prompts import to_prompts
from train.run import checkpoint
from rewards.registry import build_reward
from train.run.config_checks import ConfigError, check_rl
from train.models.evaluate import evaluate
from train.models.forward import per_document
from train.models.model_zoo import ATTENTION_FREE, load_model, load_tokenizer, resolve_model_path
from train.rl.multiturn_rollout import chat_prompts, generate_chats, merge_turns, score_chats
from train.workers.placement import plan
from train.run.run_logger import RunLogger
from train.models.runtime import seed_everything
from train.rl.update_batches import mini_batch_shares, pack_update

log = logging.getLogger(__name__)
MOMENTUM_FILE = "momentum_model.pt"  # AAPO's EMA momentum weights inside a checkpoint (when alpha < 1)


def init_ray(cluster_cfg) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if cluster_cfg.get("ray_address"):
        ray.init(address=cluster_cfg.ray_address, log_to_driver=False)
    else:
        ray.init(num_cpus=cluster_cfg.get("ray_num_cpus") or os.cpu_count(), include_dashboard=False, log_to_driver=False)


def cpu_threads(cores: int, world_size: int, num_workers: int, overlap: bool, placement_mode: str) -> tuple[int | None, int | None]:
    """Torch threads (per trainer rank, per rollout worker) on a CPU machine of ``cores`` cores.

    Colocated and on-policy, generation and update alternate: each gets every core in turn. With
    ``overlap`` (rollout.async_steps=1) they run at the same time: the cores are split in half. Disaggregated:
    None, i.e. Ray's setting for an actor that holds CPUs of its own (OMP_NUM_THREADS = its num_cpus)."""
    if placement_mode != "colocated":
        return None, None
    if not overlap:
        return max(1, cores // world_size), max(1, cores // num_workers)
    rollout_cores = max(1, cores // 2)
    return max(1, (cores - rollout_cores) // world_size), max(1, rollout_cores // num_workers)


class Sampled(NamedTuple):
    """One sampling round: rollouts grouped by prompt, their rewards [B] and components, the momentum model's
    rewards [B] (AAPO, else None) and the prompt of each rollout."""

    rollouts: list
    rewards: torch.Tensor
    components: dict
    momentum_rewards: torch.Tensor | None
    owners: list

    def select(self, index: torch.Tensor) -> "Sampled":
        keep = index.tolist()
        return Sampled([self.rollouts[i] for i in keep], self.rewards[index], {k: v[index] for k, v in self.components.items()},
                       None if self.momentum_rewards is None else self.momentum_rewards[index], [self.owners[i] for i in keep])


class Submitted(NamedTuple):
    """A sampling round under way: the prompts, the round (DAPO refills), the step that will train on it, and
    the handles whose ``result()`` gives (rollouts, per-turn rollouts or None) of the policy and of AAPO's
    momentum model (None without one)."""

    batch: list
    attempt: int
    at_step: int
    policy: object
    momentum: object | None


class Done:
    """A handle whose result is already here (multi-turn rounds, rollouts restored from a checkpoint, or kept
    for one; ``scoring`` as in Single)."""

    def __init__(self, value, scoring=None):
        self.value, self.scoring = value, scoring

    def result(self):
        return self.value


class Single:
    """A pool generation's handle in the (rollouts, None) shape of multi-turn sampling; ``scoring``: the reward
    workers' scoring of it, started with it (None when rewards are computed in the driver)."""

    def __init__(self, pending, scoring=None):
        self.pending, self.scoring = pending, scoring

    def result(self):
        return self.pending.result(), None


PENDING_FILE = "pending_rollouts.pt"  # rollout.async_steps=1: the next step's rollouts, sampled before the save


def make_sampler(sampler_cfg, prompts, batch_size: int, seed: int):
    """The ``sampler`` group's prompt sampler. ``_partial_``: the prompts must reach it as objects (instantiate
    would turn call-time arguments into configs: dataclasses to DictConfig, lists to ListConfig)."""
    return instantiate(sampler_cfg, _partial_=True)(prompts=prompts, batch_size=batch_size, seed=seed)


def sample_table(owners, rollouts, rewards, components, per_group: int = 2, max_rows: int = 16) -> list[dict]:
    """Rows of the W&B sample table: the first ``per_group`` responses of each prompt, up to ``max_rows``."""
    rows, seen = [], {}
    for i, (prompt, rollout) in enumerate(zip(owners, rollouts)):
        seen[prompt.prompt_id] = seen.get(prompt.prompt_id, 0) + 1
        if seen[prompt.prompt_id] > per_group or len(rows) >= max_rows:
            continue
        rows.append({"prompt_id": prompt.prompt_id, "prompt": prompt.text, "response": rollout.response_text,
                     "answer": str(prompt.answer), "reward": float(rewards[i]),
                     **{f"reward_{k}": float(v[i]) for k, v in components.items()},
                     "length": len(rollout.response_ids), "truncated": bool(rollout.truncated),
                     "policy_version": rollout.policy_version})
    return rows


def make_loss_fn(objective, normalizer: float):
    """Loss closure run on each trainer rank: per-document tensors from the packed rows, then the objective.
    ``normalizer`` is the global count the aggregation divides by, so micro-batch losses add up exactly."""

    def loss_fn(logprobs, entropy, batch, extra):
        lp, mask = per_document(logprobs, batch)  # [docs, resp_len]
        ent, _ = per_document(entropy, batch)
        width = lp.shape[1]
        # no recorded pi_old: one update from the weights that sampled, so pi_old is pi itself (ratio exactly 1)
        old = extra["old_logprobs"][:, :width] if extra["old_logprobs"] is not None else lp.detach()
        ref = extra["ref_logprobs"][:, :width] if extra.get("ref_logprobs") is not None else None
        loss, metrics = objective(lp, old, extra["advantages"], mask, ref_logprobs=ref, normalizer=normalizer)
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["entropy_sum"] = float((ent * mask).sum())
        metrics["tokens"] = float(mask.sum())
        return loss, metrics

    return loss_fn


def run(cfg: DictConfig) -> dict:
    check_rl(cfg)
    import ray

    from train.workers.actors import RolloutPool, TrainerFailure, TrainerGroup
    from train.workers.reference_worker import ReferenceWorker
    from train.workers.reward_workers import RewardPool, reward_inputs

    run_dir = Path(cfg.run_dir)
    if cfg.cluster.get("num_threads"):  # the driver's own torch work: held-out evaluation, checkpoint conversion
        torch.set_num_threads(cfg.cluster.num_threads)
    seed_everything(cfg.seed)
    t_cfg, r_cfg, a_cfg = cfg.trainer, cfg.rollout, cfg.algorithm

    # Data and reward functions first: bad rows or reward settings fail before any actor starts.
    multi_turn = bool(r_cfg.get("multi_turn", False))  # the policy answers every user turn of each chat itself
    train_rows = load_split(cfg.data, "train", require_assistant=False)
    prompts = (chat_prompts if multi_turn else to_prompts)(train_rows, cfg.data.system_prompt)
    eval_rows = load_split(cfg.data, "eval") if cfg.data.source == "synthetic" or cfg.data.eval_files else []
    sampler = make_sampler(cfg.sampler, prompts, r_cfg.prompts_per_step, cfg.seed)
    if cfg.model.get("path"):
        with open_dict(cfg):  # a run directory means its latest checkpoint
            cfg.model.path = str(checkpoint.resolve_model_dir(cfg.model.path))
    model_path = str(resolve_model_path(cfg.model))
    if "bingo" in cfg.reward and cfg.reward.bingo.get("scorer", {}).get("model", "") is None:
        with open_dict(cfg):  # the self-information scorer defaults to the policy's starting weights
            cfg.reward.bingo.scorer.model = model_path
    # rollout.reward_workers=0: the reward functions run in this process (built now, so bad settings fail first);
    # else in reward worker actors (started below, before any other actor)
    reward_workers = int(r_cfg.get("reward_workers", 1))
    reward_fn = build_reward(cfg.reward) if reward_workers == 0 else None
    group_size = int(a_cfg.group_size)
    advantage_fn = instantiate(a_cfg.advantage)
    objective = instantiate(a_cfg.loss)
    dynamic = instantiate(a_cfg.dynamic_sampling) if a_cfg.get("dynamic_sampling") else None
    overlong = instantiate(a_cfg.overlong_penalty) if a_cfg.get("overlong_penalty") else None
    kl_beta = float(a_cfg.kl.beta)
    kl_reward = instantiate(a_cfg.kl_reward) if a_cfg.kl.placement == "reward" and kl_beta > 0 else None
    momentum_update = instantiate(a_cfg.momentum) if a_cfg.get("momentum") else None

    tokenizer = load_tokenizer(model_path)
    # trainer.share_prompt: the update (and log-prob forwards) run each prompt once for its G responses
    # (data_pipelines/shared_prompt.py); auto = on for single-turn rollouts of attention models under sdpa
    wanted = t_cfg.get("share_prompt", "auto")
    attention_free = AutoConfig.from_pretrained(model_path).model_type in ATTENTION_FREE
    if wanted is True and attention_free:
        raise ConfigError("trainer.share_prompt=true needs an attention model (a KV cache to share); this model is "
                          "attention-free: set trainer.share_prompt=auto or false")
    share_prompt = wanted is True or (wanted == "auto" and cfg.model.attn_backend == "sdpa" and not multi_turn
                                      and not attention_free)
    resume_from = checkpoint.resolve_resume(t_cfg.resume, run_dir)
    start_path = str(resume_from) if resume_from else model_path
    init_ray(cfg.cluster)

    micro_batches = t_cfg.world_size * t_cfg.micro_batches_per_rank
    mini_batches = int(t_cfg.get("ppo_mini_batches", 1))
    momentum_workers = r_cfg.num_workers if a_cfg.get("momentum_rollout") else 0
    places = plan(cfg.cluster.placement, torch.cuda.is_available(), t_cfg.world_size, r_cfg.num_workers, momentum_workers)
    # rollout.async_steps=1: the next step's rollouts are generated (by the weights before this step's update)
    # while this step's update runs; they are one policy version old when trained on
    overlap = int(r_cfg.get("async_steps", 0)) == 1
    rollout_workers = r_cfg.num_workers + momentum_workers
    trainer_threads, rollout_threads = None, None
    if not torch.cuda.is_available() and not cfg.cluster.get("ray_address"):
        cores = int(cfg.cluster.get("ray_num_cpus") or os.cpu_count() or 1)
        trainer_threads, rollout_threads = cpu_threads(cores, t_cfg.world_size, rollout_workers, overlap, cfg.cluster.placement)
    trainer_threads = t_cfg.get("num_threads") or trainer_threads
    rollout_threads = r_cfg.get("num_threads") or rollout_threads
    if reward_fn is None:  # rewards are computed after generation: the rollout workers' threads are free then
        reward_fn = RewardPool(reward_workers, OmegaConf.to_container(cfg.reward, resolve=True), places.reward,
                               num_threads=rollout_threads)
    trainer = TrainerGroup(t_cfg.world_size, start_path, cfg.model.attn_backend, OmegaConf.to_container(t_cfg),
                           t_cfg.micro_batches_per_rank, cfg.seed, places.trainer, num_threads=trainer_threads)
    pool = RolloutPool(r_cfg.num_workers, start_path, cfg.seed, places.rollout, backend=r_cfg.backend,
                       num_threads=rollout_threads)
    reference = None
    if kl_beta > 0:
        reference = ray.remote(ReferenceWorker).options(**places.reference).remote(model_path, cfg.model.attn_backend)
    # AAPO: the momentum model is sampled by rollout workers of its own, like the policy. It starts as the
    # initial policy; with momentum.alpha < 1 it follows the policy by EMA (weights kept here and checkpointed).
    momentum_pool, momentum_state = None, None
    if a_cfg.get("momentum_rollout"):
        momentum_pool = RolloutPool(r_cfg.num_workers, model_path, cfg.seed + 7_919, places.momentum, backend=r_cfg.backend,
                                    num_threads=rollout_threads)

    step, prefetched = 0, None  # prefetched: the next step's first sampling round, under way (async_steps=1)
    if resume_from is not None:
        state = checkpoint.load_trainer_state(resume_from)
        trainer.load_state(str(resume_from))
        sampler.load_state_dict(state["sampler"])
        reward_fn.load_state_dict(state.get("reward", {}))  # e.g. Bingo's dynamic length schedule
        checkpoint.set_rng_state(state["rng"])
        step = state["step"]
        pool.sync(trainer.full_state_dict(), step)
        if momentum_pool is not None and (resume_from / MOMENTUM_FILE).exists():
            momentum_state = torch.load(resume_from / MOMENTUM_FILE)
            momentum_pool.sync(momentum_state, step)
        if (resume_from / PENDING_FILE).exists():  # sampled before the save by the weights before the last update
            saved = torch.load(resume_from / PENDING_FILE, weights_only=False)
            prefetched = Submitted(saved["batch"], saved["attempt"], saved["at_step"], Done(saved["policy"]),
                                   None if saved["momentum"] is None else Done(saved["momentum"]))
        log.info("resumed from %s at step %d", resume_from, step)

    logger = RunLogger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True))
    hf_model = load_model(model_path)  # the driver's copy, only for HF-format checkpoints and evaluation

    def lr_at(s: int) -> float:
        if s < t_cfg.warmup_steps:
            return t_cfg.lr * (s + 1) / max(t_cfg.warmup_steps, 1)
        progress = (s - t_cfg.warmup_steps) / max(t_cfg.max_steps - t_cfg.warmup_steps, 1)
        return t_cfg.lr * (t_cfg.min_lr_ratio + (1 - t_cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    def write_extra(tmp: Path) -> None:  # inside the atomic checkpoint write
        nonlocal prefetched
        trainer.save_state(str(tmp))
        if momentum_state is not None:
            torch.save(momentum_state, tmp / MOMENTUM_FILE)
        if prefetched is not None:  # the sampler has drawn its prompts: keep the rollouts so a resume trains on them
            policy = prefetched.policy.result()
            momentum = None if prefetched.momentum is None else prefetched.momentum.result()
            # the reward workers may have scored them already (from the state before this step): keep that result
            prefetched = prefetched._replace(
                policy=Done(policy, prefetched.policy.scoring),
                momentum=None if momentum is None else Done(momentum, prefetched.momentum.scoring))
            torch.save({"batch": prefetched.batch, "attempt": prefetched.attempt, "at_step": prefetched.at_step,
                        "policy": policy, "momentum": momentum}, tmp / PENDING_FILE)

    def save(weights):
        hf_model.load_state_dict(weights, strict=False)
        return checkpoint.save(run_dir, step, hf_model, tokenizer, {"sampler": sampler.state_dict(), "algorithm": a_cfg.name,
                                                                    "reward": reward_fn.state_dict()},
                               t_cfg.keep_last, write_extra=write_extra)

    def run_eval(weights) -> dict:
        if not eval_rows:
            return {}
        hf_model.load_state_dict(weights, strict=False)
        result = evaluate(hf_model, tokenizer, eval_rows, r_cfg.max_new_tokens, r_cfg.batch_size,
                          samples=int(r_cfg.get("eval_samples", 0)), temperature=r_cfg.temperature, top_p=r_cfg.top_p,
                          seed=cfg.seed)
        logger.log_samples("eval/samples", result.pop("samples"), step)
        logger.log(result, step)
        return result

    history, eval_result, weights = [], {}, None
    initial_eval = run_eval(trainer.full_state_dict()) if t_cfg.eval_at_start and step == 0 else {}
    progress = tqdm(total=t_cfg.max_steps, initial=step, desc=f"rl:{a_cfg.name}", dynamic_ncols=True)

    def score(batch, rollouts, scoring=None):
        """Rewards [B] and components of a round (+ DAPO's overlong shaping). ``scoring``: the reward workers'
        scoring started with the generation; if it failed (a rollout worker died and its share was generated
        again, or a reward worker died), the rollouts are scored now."""
        result = None
        if scoring is not None:
            try:
                result = scoring.result()
            except ray.exceptions.RayError as err:
                log.warning("reward scoring started with the generation failed (%s); scoring the rollouts again",
                            type(err).__name__)
        if result is None:
            result = reward_fn(*reward_inputs(batch, rollouts), step=step, group_size=group_size)
        rewards, components, _ = result
        if overlong is not None:
            penalty = overlong(torch.tensor([len(r.response_ids) for r in rollouts]))
            rewards, components = rewards + penalty, {**components, "overlong_penalty": penalty}
        return rewards, components

    sampling = dict(max_new_tokens=r_cfg.max_new_tokens, temperature=r_cfg.temperature, top_p=r_cfg.top_p)

    def submit(batch, attempt: int, at_step: int) -> Submitted:
        """Start sampling G responses per prompt of ``batch`` (and as many from AAPO's momentum model) for the
        update of step ``at_step``. Multi-turn chats take several rounds and are sampled here, to the end."""
        seed = cfg.seed * 100_003 + at_step * 101 + attempt

        def start(workers, seed):
            if not multi_turn:  # reward workers score the rollouts as soon as they exist (during the update, async)
                pending = workers.submit([p.text for p in batch], group_size, seed=seed, **sampling)
                scoring = None if reward_workers == 0 else reward_fn.submit_rollouts(
                    batch, pending.shard_refs(), step=at_step, group_size=group_size)
                return Single(pending, scoring)
            turns = generate_chats(workers, tokenizer, batch, group_size, seed, **sampling)
            return Done((merge_turns(turns), turns))

        t = time.perf_counter()
        policy = start(pool, seed)
        momentum = start(momentum_pool, seed + 50_021) if momentum_pool is not None else None
        timing["generation"] = timing.get("generation", 0.0) + time.perf_counter() - t
        return Submitted(batch, attempt, at_step, policy, momentum)

    def collect(sub: Submitted) -> Sampled:
        """The round's rollouts (waiting for them: the generation time this step did not overlap), their
        rewards [B] and reward components (+ DAPO shaping), and for AAPO the momentum responses' rewards [B]."""
        batch = sub.batch

        def scored(handle, rollouts, turns):
            if turns is not None:
                return score_chats(score, batch, turns)
            return score(batch, rollouts, handle.scoring)

        t = time.perf_counter()
        rollouts, turns = sub.policy.result()
        momentum = sub.momentum.result() if sub.momentum is not None else None
        timing["generation"] = timing.get("generation", 0.0) + time.perf_counter() - t
        t = time.perf_counter()  # reward: the scoring time not overlapped with generation or the update
        rewards, components = scored(sub.policy, rollouts, turns)
        if hasattr(sampler, "update"):  # difficulty-aware samplers track each prompt's pass rate
            sampler.update([batch[r.prompt_index].prompt_id for r in rollouts], components["correctness"].tolist())
        momentum_rewards = None if momentum is None else scored(sub.momentum, *momentum)[0]
        timing["reward"] = timing.get("reward", 0.0) + time.perf_counter() - t
        return Sampled(rollouts, rewards, components, momentum_rewards, [batch[r.prompt_index] for r in rollouts])

    try:
        while step < t_cfg.max_steps:
            timing = {}
            # DAPO dynamic sampling: drop groups whose rewards are all equal and refill with new prompts, at most
            # rollout.max_refill_rounds extra rounds; without it, one round.
            parts, kept_groups, dropped_groups, attempt = [], 0, 0, 0
            while kept_groups < r_cfg.prompts_per_step and attempt <= (r_cfg.max_refill_rounds if dynamic else 0):
                if attempt == 0 and prefetched is not None:
                    part, prefetched = collect(prefetched), None
                else:
                    part = collect(submit(sampler.next(), attempt, step))
                if dynamic is not None:
                    keep, dropped = dynamic(part.rewards, group_size)
                    dropped_groups += dropped
                    part = part.select(keep.nonzero().squeeze(1)[: (r_cfg.prompts_per_step - kept_groups) * group_size])
                kept_groups += len(part.rollouts) // group_size
                parts.append(part)
                attempt += 1
            if overlap and step + 1 < t_cfg.max_steps:  # the next step's rollouts, sampled during this update
                prefetched = submit(sampler.next(), 0, step + 1)
            rollouts = [r for part in parts for r in part.rollouts]
            batch_prompts = [p for part in parts for p in part.owners]
            rewards = torch.cat([part.rewards for part in parts])
            components = {k: torch.cat([part.components[k] for part in parts]) for k in parts[0].components}
            momentum_rewards = None if momentum_pool is None else torch.cat([part.momentum_rewards for part in parts])
            if len(rollouts) < micro_batches:  # every group was dropped: nothing to learn from this step
                step += 1
                logger.log({"rollout/dropped_groups": dropped_groups, "rollout/kept_groups": kept_groups,
                            "rollout/sampling_rounds": attempt, "train/skipped_update": 1.0}, step)
                progress.update(1)
                continue

            # trainer.ppo_mini_batches optimizer steps per epoch, each on a share of whole groups, packed into
            # world_size * micro_batches_per_rank micro-batches
            updates = [pack_update(rollouts, share, micro_batches, share_prompt=share_prompt, group_size=group_size,
                                   row_tokens=t_cfg.row_tokens, attn_backend=cfg.model.attn_backend,
                                   pad_token_id=tokenizer.pad_token_id, mask_truncated=bool(a_cfg.get("mask_truncated", False)))
                       # a DAPO step short of groups may fill fewer mini-batches
                       for share in mini_batch_shares(len(rollouts), group_size,
                                                      min(mini_batches, len(rollouts) // group_size, len(rollouts) // micro_batches))]
            optimizer_steps = t_cfg.ppo_epochs * len(updates)
            step_tokens = sum(u.tokens for u in updates)
            # pi_old log-probs need their own forward only when the update cannot produce them: several optimizer
            # steps per rollout batch (PPO epochs or mini-batches: later ones see moved weights) or KL folded into
            # the reward (needed before the advantages). With one step the update's own log-probs, detached, are
            # exactly pi_old (as in TRL).
            old = [[None] * len(u.micro) for u in updates]
            masks = [[None] * len(u.micro) for u in updates]
            if optimizer_steps > 1 or kl_reward is not None:
                t = time.perf_counter()
                for k, u in enumerate(updates):
                    old[k], masks[k] = zip(*[per_document(lp, b) for lp, b in zip(trainer.logprobs(u.micro), u.micro)])
                timing["old_logprobs"] = time.perf_counter() - t
            ref = [[None] * len(u.micro) for u in updates]
            if reference is not None:
                t = time.perf_counter()
                for k, u in enumerate(updates):
                    ref[k] = [per_document(lp, b)[0] for lp, b in zip(ray.get(reference.logprobs.remote(u.micro)), u.micro)]
                timing["reference"] = time.perf_counter() - t
            task_rewards = rewards
            if kl_reward is not None:  # kl.placement=reward: r_i - beta * sum_t kl_it, on the sampling-time log-probs
                rewards = rewards.clone()
                for k, u in enumerate(updates):
                    for m, o, rf, mask in zip(u.members, old[k], ref[k], masks[k]):
                        rewards[m] = kl_reward(rewards[m], o, rf, mask)
            if momentum_rewards is not None:
                advantages = advantage_fn(rewards, group_size, momentum_rewards)  # [num_rollouts]
            else:
                advantages = advantage_fn(rewards, group_size)  # [num_rollouts]
            extras = [[{"advantages": advantages[torch.tensor(m)], "old_logprobs": o, "ref_logprobs": rf}
                       for m, o, rf in zip(u.members, old[k], ref[k])] for k, u in enumerate(updates)]
            token_mean = a_cfg.loss.aggregation.get("mode", "token-mean") == "token-mean"

            t = time.perf_counter()
            trainer.set_lr(lr_at(step))
            stats = {}
            for _ in range(t_cfg.ppo_epochs):
                for u, u_extras in zip(updates, extras):
                    normalizer = float(u.response_tokens if token_mean else u.samples)
                    for rank_stats in trainer.train_step(u.micro, make_loss_fn(objective, normalizer), 1.0, u_extras):
                        for k, v in rank_stats.items():
                            stats[k] = stats.get(k, 0.0) + v
            timing["update"] = time.perf_counter() - t
            step += 1

            if prefetched is not None:  # the workers finish the next step's rollouts before they take new weights
                t = time.perf_counter()
                prefetched.policy.result()
                if prefetched.momentum is not None:
                    prefetched.momentum.result()
                timing["generation"] = timing.get("generation", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            weights = trainer.full_state_dict()
            pool.sync(weights, step)
            if momentum_update is not None and momentum_pool is not None:
                if momentum_state is None and momentum_update.keywords.get("alpha", 1.0) < 1.0:
                    momentum_state = {k: v.clone() for k, v in load_model(model_path).state_dict().items() if k in weights}
                if momentum_state is not None and momentum_update(momentum_state, {k: weights[k] for k in momentum_state}, step=step):
                    momentum_pool.sync(momentum_state, step)
            timing["weight_sync"] = time.perf_counter() - t

            lengths = torch.tensor([len(r.response_ids) for r in rollouts], dtype=torch.float)
            metrics = {
                "reward/total": rewards.mean().item(),
                **({"reward/task": task_rewards.mean().item()} if kl_reward is not None else {}),
                **({"reward/momentum_total": momentum_rewards.mean().item()} if momentum_rewards is not None else {}),
                **{f"reward/{k}": v.float().mean().item() for k, v in components.items()},
                "rollout/response_length_mean": lengths.mean().item(),
                "rollout/response_length_p90": lengths.quantile(0.9).item(),
                "rollout/clipped_fraction": sum(r.truncated for r in rollouts) / len(rollouts),
                "rollout/policy_version": min(r.policy_version for r in rollouts),
                "rollout/staleness": step - 1 - min(r.policy_version for r in rollouts),  # updates since sampling
                "rollout/worker_restarts": pool.restarts,
                "rollout/dropped_groups": dropped_groups,
                "rollout/kept_groups": kept_groups,
                "rollout/sampling_rounds": attempt,
                "train/advantage_mean": advantages.mean().item(),
                "train/advantage_std": advantages.std().item() if len(advantages) > 1 else 0.0,
                "train/advantage_abs_mean": advantages.abs().mean().item(),
                "train/loss": stats.get("loss_sum", 0.0) / optimizer_steps,
                "train/optimizer_steps": optimizer_steps,
                "train/entropy": stats.get("entropy_sum", 0.0) / max(stats.get("tokens", 1.0), 1.0),
                "train/grad_norm": stats.get("grad_norm", float("nan")) / (t_cfg.world_size * optimizer_steps),
                "train/lr": lr_at(step - 1),
                **{f"perf/time_{k}": v for k, v in timing.items()},
                "perf/tokens_per_s": float(step_tokens) / sum(timing.values()),
            }
            for key in ("clip_frac_low", "clip_frac_high", "ratio_mean", "kl"):
                if key in stats:
                    metrics[f"train/{key}"] = stats[key] / (t_cfg.world_size * t_cfg.micro_batches_per_rank * optimizer_steps)
            if hasattr(sampler, "metrics"):
                metrics.update(sampler.metrics())
            history.append(metrics)
            logger.log(metrics, step)
            if logger.samples_due(step) or step == 1:
                logger.log_samples("rollout/samples", sample_table(batch_prompts, rollouts, rewards, components), step)
                logger.log_histogram("rollout/response_length_hist", lengths.tolist(), step)
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward/total']:.3f}", len=f"{metrics['rollout/response_length_mean']:.0f}")
            if t_cfg.eval_every and step % t_cfg.eval_every == 0 and step < t_cfg.max_steps:
                eval_result = run_eval(weights)
            if t_cfg.save_every and step % t_cfg.save_every == 0 and step < t_cfg.max_steps:
                save(weights)
        progress.close()

        weights = weights if weights is not None else trainer.full_state_dict()
        eval_result = run_eval(weights)
        final = save(weights)
    except TrainerFailure as err:
        progress.close()
        logger.finish()
        for group in (trainer, pool, momentum_pool, reward_fn):
            if hasattr(group, "shutdown"):
                group.shutdown()
        places.remove()
        last = checkpoint.latest(run_dir)
        raise TrainerFailure(
            f"{err}. The run stopped at step {step}; the last good checkpoint is "
            f"{last if last else 'none (no checkpoint was saved yet)'}. Fix the cause (see the trainer actor's log "
            f"above), then rerun the same command with run_dir={run_dir} and trainer.resume=auto to continue from it."
        ) from err
    logger.finish()
    trainer.shutdown()
    pool.shutdown()
    if momentum_pool is not None:
        momentum_pool.shutdown()
    reward_fn.close()
    if hasattr(reward_fn, "shutdown"):
        reward_fn.shutdown()
    places.remove()
    print(f"checkpoint: {final}")
    print(f"metrics:    {logger.metrics_path}")
    if "eval/accuracy" in eval_result:
        start = initial_eval.get("eval/accuracy")
        print(f"held-out exact match: {eval_result['eval/accuracy']:.3f}" + (f" (start {start:.3f})" if start is not None else ""))
    return {"step": step, "history": history, "checkpoint": str(final), "initial_eval": initial_eval,
            **{k: v for k, v in eval_result.items() if k.startswith("eval/")}}
