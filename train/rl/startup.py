"""Start-up and teardown of every Ray actor of an RL run, as one context manager.

Actors start in dependency order (placement group, reward workers, trainer group, rollout workers, reference
model, AAPO's momentum rollout workers); leaving the ``with`` block by any path (the end of the run, an error,
Ctrl-C) closes the reward functions and stops each of them, last started first. Where each actor runs:
train/workers/placement.py.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from train.models.lora import lora_enabled
from train.run.threads import rl_thread_plan
from train.workers.ray_session import init_ray

log = logging.getLogger(__name__)


@dataclass
class RLActors:
    """The running actors. ``rewards``: the reward worker pool, or the reward functions themselves when
    ``rollout.reward_workers=0`` (``rewards_in_workers`` False); same call signature either way."""

    trainer: object  # TrainerGroup
    rollout_pool: object  # RolloutPool
    momentum_pool: object | None  # AAPO: RolloutPool of the momentum model
    reference: object | None  # ReferenceWorker actor (KL)
    rewards: object
    rewards_in_workers: bool


def _stop(what: str, call) -> None:
    """Teardown goes on past an actor that is already gone (e.g. the rank whose failure stopped the run)."""
    try:
        call()
    except Exception as err:  # noqa: BLE001 - teardown must reach every actor
        log.warning("while stopping %s: %s: %s", what, type(err).__name__, err)


@contextmanager
def start_actors(cfg, start_path: str, model_path: str, driver_rewards, kl_beta: float):
    """Yield ``RLActors`` for ``cfg``; the trainer and rollout workers load ``start_path`` (a checkpoint when
    resuming), the reference and momentum models ``model_path``. ``driver_rewards``: the reward functions, built
    in the driver when ``rollout.reward_workers=0`` (else None: reward workers start here)."""
    import ray

    from train.run.vllm_settings import vllm_settings
    from train.workers.actors import RolloutPool, TrainerGroup
    from train.workers.placement import plan
    from train.workers.reference_worker import ReferenceWorker, reference_settings
    from train.workers.reward_workers import RewardPool
    from train.workers.weight_broadcast import sync_method

    t_cfg, r_cfg = cfg.trainer, cfg.rollout
    init_ray(cfg.cluster.get("ray_address"), cfg.cluster.get("ray_num_cpus"))
    momentum_workers = r_cfg.num_workers if cfg.algorithm.get("momentum_rollout") else 0
    threads = rl_thread_plan(cfg, momentum_workers)  # train/run/threads.py: no two of our processes oversubscribe
    trainer_threads, rollout_threads = threads.trainer, threads.rollout

    with ExitStack() as stack:
        places = plan(cfg.cluster.placement, torch.cuda.is_available(), t_cfg.world_size, r_cfg.num_workers, momentum_workers,
                      strategy=cfg.cluster.get("bundle_strategy") or "PACK")
        stack.callback(_stop, "the placement group", places.remove)
        rewards = driver_rewards
        if rewards is None:  # rewards are computed after generation: the rollout workers' threads are free then
            rewards = RewardPool(int(r_cfg.get("reward_workers", 1)), OmegaConf.to_container(cfg.reward, resolve=True),
                                 places.reward, num_threads=threads.reward)
            stack.callback(_stop, "the reward workers", rewards.shutdown)
        stack.callback(_stop, "the reward functions", rewards.close)
        # under LoRA the trainer starts from the base model (a checkpoint's HF model is the merged one) and a resume
        # restores its adapters from the DeepSpeed state; model.lora travels with the trainer settings
        lora = OmegaConf.to_container(cfg.model.lora, resolve=True) if cfg.model.get("lora") else None
        trainer_path = model_path if lora_enabled(lora) else start_path
        trainer = TrainerGroup(t_cfg.world_size, trainer_path, cfg.model.attn_backend, {**OmegaConf.to_container(t_cfg), "lora": lora},
                               t_cfg.micro_batches_per_rank, cfg.seed, places.trainer, num_threads=trainer_threads,
                               timeout_s=cfg.cluster.get("actor_timeout_s", 1800))
        stack.callback(_stop, "the trainer group", trainer.shutdown)
        precision = t_cfg.get("precision", "auto")
        vllm = vllm_settings(r_cfg.get("vllm"), cfg.cluster.placement) if r_cfg.backend == "vllm" else None
        rollout_pool = RolloutPool(r_cfg.num_workers, start_path, cfg.seed, places.rollout, backend=r_cfg.backend,
                                   num_threads=rollout_threads, precision=precision, vllm_settings=vllm,
                                   timeout_s=cfg.cluster.get("actor_timeout_s", 1800))
        stack.callback(_stop, "the rollout workers", rollout_pool.shutdown)
        sync = sync_method(r_cfg.get("weight_sync") or "auto", torch.cuda.is_available(), cfg.cluster.placement,
                           r_cfg.backend)
        if sync != "object_store":  # trainer rank 0 broadcasts the weights (the momentum model's stay in the store)
            rollout_pool.use_broadcast(trainer, sync)
        reference = None
        if kl_beta > 0:
            # on the device its placement grants, in the trainer's precision
            reference = ray.remote(ReferenceWorker).options(**places.reference).remote(
                model_path, cfg.model.attn_backend, **reference_settings(places.reference, t_cfg.get("precision", "auto")),
                num_threads=threads.reference, logits_chunk_tokens=t_cfg.get("logits_chunk_tokens"))
            stack.callback(_stop, "the reference model", lambda: ray.kill(reference))
        momentum_pool = None
        if momentum_workers:  # AAPO: the momentum model starts as the initial policy
            momentum_pool = RolloutPool(r_cfg.num_workers, model_path, cfg.seed + 7_919, places.momentum,
                                        backend=r_cfg.backend, num_threads=rollout_threads, precision=precision,
                                        vllm_settings=vllm, timeout_s=cfg.cluster.get("actor_timeout_s", 1800))
            stack.callback(_stop, "the momentum rollout workers", momentum_pool.shutdown)
        yield RLActors(trainer, rollout_pool, momentum_pool, reference, rewards, rewards_in_workers=driver_rewards is None)
