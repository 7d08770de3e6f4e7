"""Torch threads of every process a run starts, chosen so that our own processes never oversubscribe the cores.

On a shared CPU, two torch processes whose OpenMP thread pools together exceed the cores slow each other 10-20x
(idle threads spin waiting for their peers). So on a CPU machine with a local Ray every process gets an explicit
count, from the cores (``cluster.ray_num_cpus``, else the machine's) and from which processes compute at the same
time:

- RL on-policy, colocated: generation, reward scoring, the reference forward and the update take turns, so each
  phase gets every core: trainer ranks ``cores // world_size`` each, rollout workers ``cores // workers`` each
  (AAPO's momentum workers counted in), reward workers as rollout workers, the reference model ``cores``.
- RL with ``rollout.async_steps=1``: generation (and scoring) of the next step overlaps the update, so the cores are
  halved: the rollout side gets ``cores // 2``, the trainer side (ranks, reference) the rest.
- SFT: trainer ranks ``cores // world_size`` each.

``trainer.num_threads`` / ``rollout.num_threads`` override the per-rank / per-worker counts (the reference follows
the trainer ranks': ``world_size * trainer.num_threads``); ``cluster.num_threads`` sets the driver's, whose torch
work (packing, advantages, checkpoint conversion, driver-side evaluation) runs while the actors wait. With
``cluster.placement=disaggregated``, a remote cluster (``cluster.ray_address``) or on GPU the counts are None:
Ray's own setting applies (an actor's OMP_NUM_THREADS is its ``num_cpus``, at least 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ThreadPlan:
    """Torch intra-op threads per process (None: Ray's / torch's default)."""

    trainer: int | None  # per trainer rank
    rollout: int | None  # per rollout worker (and per AAPO momentum worker)
    reward: int | None  # per reward worker
    reference: int | None  # the KL reference model
    driver: int | None  # the driver process


def cpu_threads(cores: int, world_size: int, num_workers: int, overlap: bool, placement_mode: str) -> tuple[int | None, int | None]:
    """(threads per trainer rank, per rollout worker) on a CPU machine of ``cores`` cores, before overrides: every
    core per phase when phases alternate, the cores halved between the sides under ``overlap``; (None, None) when
    disaggregated (each actor holds CPUs of its own)."""
    if placement_mode != "colocated":
        return None, None
    if not overlap:
        return max(1, cores // world_size), max(1, cores // num_workers)
    rollout_cores = max(1, cores // 2)
    return max(1, (cores - rollout_cores) // world_size), max(1, rollout_cores // num_workers)


def local_cpu_cores(cfg) -> int | None:
    """The cores our processes share: those of a local Ray on a CPU machine; None on GPU or a remote cluster."""
    if torch.cuda.is_available() or cfg.cluster.get("ray_address"):
        return None
    return int(cfg.cluster.get("ray_num_cpus") or os.cpu_count() or 1)


def rl_thread_plan(cfg, momentum_workers: int = 0) -> ThreadPlan:
    """Every RL process's threads for ``cfg`` (the rules in the module docstring)."""
    t_cfg, r_cfg = cfg.trainer, cfg.rollout
    world = int(t_cfg.world_size)
    trainer, rollout = None, None
    cores = local_cpu_cores(cfg)
    if cores is not None:
        overlap = int(r_cfg.get("async_steps", 0)) == 1
        trainer, rollout = cpu_threads(cores, world, int(r_cfg.num_workers) + momentum_workers, overlap,
                                       cfg.cluster.placement)
    trainer = t_cfg.get("num_threads") or trainer
    rollout = r_cfg.get("num_threads") or rollout
    return ThreadPlan(trainer=trainer, rollout=rollout, reward=rollout,
                      reference=world * trainer if trainer else None, driver=cfg.cluster.get("num_threads") or None)


def sft_thread_plan(cfg) -> ThreadPlan:
    """SFT's processes: the trainer ranks split the cores; the driver's own count from ``cluster.num_threads``."""
    trainer = cfg.trainer.get("num_threads")
    cores = local_cpu_cores(cfg)
    if not trainer and cores is not None:
        trainer = max(1, cores // int(cfg.trainer.world_size))
    return ThreadPlan(trainer=int(trainer) if trainer else None, rollout=None, reward=None, reference=None,
                      driver=cfg.cluster.get("num_threads") or None)


def set_threads(count: int | None) -> None:
    """This process's torch intra-op threads (``None``: leave the default)."""
    if count:
        torch.set_num_threads(int(count))
