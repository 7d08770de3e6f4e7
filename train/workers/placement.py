"""Where each RL actor runs: the Ray options (resources, placement-group bundle) of every actor, by kind.

``cluster.placement``:
- ``colocated``: rollout, momentum and reference actors share the trainer ranks' devices (the driver alternates
  phases, so they rarely compute at the same time). On GPUs a placement group holds one bundle
  {GPU: 1, CPU: 1} per trainer rank; rank i runs in bundle i, rollout worker j in bundle j mod world_size (as
  verl's colocated workers), the reference in bundle 0, each with the same fraction of its bundle's GPU. Without
  the bundles Ray packs fractional requests onto the first GPU with room, so two trainer ranks could share one
  GPU while another stays idle (NCCL refuses a world with a duplicate GPU). On CPU: trainer ranks hold one CPU
  each, every other actor none.
- ``disaggregated``: every trainer rank, rollout/momentum worker and the reference hold a device (GPU, or CPU) of
  their own.
Reward workers hold CPUs only (none when colocated): their scorers run on CPU.

``cluster.bundle_strategy`` (colocated): Ray's placement-group strategy for the trainer ranks' bundles. PACK (the
default) fills one node first; STRICT_SPREAD puts every rank (and the rollout workers of its bundle) on a node of
its own, SPREAD does so where it can, STRICT_PACK keeps them all on one node. On CPU, PACK reserves no bundles (as
before); any other value reserves one {CPU: 1} bundle per trainer rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from train.run.config_checks import BUNDLE_STRATEGIES as STRATEGIES


def device_of(options: dict) -> str:
    """The torch device of an actor started with Ray ``options``: cuda when they grant it a GPU (or a share of one)."""
    return "cuda" if options.get("num_gpus", 0) > 0 else "cpu"


@dataclass
class Placement:
    """Ray actor options (``ray.remote(cls).options(**opts)``) per actor; ``group``: the placement group, if any."""

    trainer: list[dict]
    rollout: list[dict]
    momentum: list[dict]
    reference: dict
    reward: dict
    group: object | None = field(default=None, repr=False)

    def remove(self) -> None:
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
            self.group = None


def plan(mode: str, on_gpu: bool, world_size: int, rollout_workers: int, momentum_workers: int = 0,
         ready_timeout_s: float = 600.0, strategy: str = "PACK") -> Placement:
    """The options of every actor of an RL run (on GPUs with ``colocated``, after the bundles are reserved)."""
    if mode == "disaggregated":
        own = {"num_gpus": 1, "num_cpus": 1} if on_gpu else {"num_cpus": 1}
        return Placement([dict(own) for _ in range(world_size)], [dict(own) for _ in range(rollout_workers)],
                         [dict(own) for _ in range(momentum_workers)], dict(own), {"num_cpus": 1})
    if mode != "colocated":
        raise ValueError(f"cluster.placement={mode!r} must be colocated or disaggregated")
    if strategy not in STRATEGIES:
        raise ValueError(f"cluster.bundle_strategy={strategy!r} must be one of {', '.join(STRATEGIES)}")
    if not on_gpu and strategy == "PACK":
        return Placement([{"num_cpus": 1} for _ in range(world_size)], [{"num_cpus": 0} for _ in range(rollout_workers)],
                         [{"num_cpus": 0} for _ in range(momentum_workers)], {"num_cpus": 0}, {"num_cpus": 0})

    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    rollout_bundles = [j % world_size for j in range(rollout_workers)]
    momentum_bundles = [j % world_size for j in range(momentum_workers)]
    reference_bundle = 0
    per_bundle = [1 + rollout_bundles.count(b) + momentum_bundles.count(b) + (b == reference_bundle)
                  for b in range(world_size)]
    # Ray takes GPU fractions in steps of 1e-4; two decimals suffice
    share = math.floor(100 / max(per_bundle)) / 100 if on_gpu else 0
    bundle = {"GPU": 1, "CPU": 1} if on_gpu else {"CPU": 1}
    group = placement_group([dict(bundle) for _ in range(world_size)], strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=ready_timeout_s)
    if not ready:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(group)
        raise RuntimeError(
            f"cluster.placement=colocated: Ray could not reserve {world_size} bundles of {bundle} for the trainer "
            f"ranks ({strategy}) within {ready_timeout_s:.0f} s; the cluster has {ray.cluster_resources().get('GPU', 0)} "
            f"GPUs and {len([n for n in ray.nodes() if n['Alive']])} nodes. Lower trainer.world_size, add nodes or set "
            "cluster.bundle_strategy=PACK"
        )

    def in_bundle(index: int, cpus: float) -> dict:
        in_group = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)
        return {"num_gpus": share, "num_cpus": cpus, "scheduling_strategy": in_group}

    return Placement([in_bundle(i, 1) for i in range(world_size)], [in_bundle(b, 0) for b in rollout_bundles],
                     [in_bundle(b, 0) for b in momentum_bundles], in_bundle(reference_bundle, 0), {"num_cpus": 0},
                     group)
