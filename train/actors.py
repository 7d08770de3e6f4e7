"""Ray actors with one job each. This file holds the policy trainer group; the driver (the RL recipe) talks
to the group as if it were one trainer."""

from __future__ import annotations

import socket

import ray

from train.policy_trainer import PolicyTrainer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrainerGroup:
    """``world_size`` PolicyTrainer actors forming one torch.distributed world (rank 0 holds full weights)."""

    def __init__(self, world_size: int, model_path: str, attn_backend: str, trainer_cfg: dict,
                 micro_batches_per_rank: int, seed: int = 0, num_cpus_per_rank: float = 1, num_gpus_per_rank: float = 0):
        self.world_size = world_size
        actor = ray.remote(num_cpus=num_cpus_per_rank, num_gpus=num_gpus_per_rank)(PolicyTrainer)
        address, port = "127.0.0.1", free_port()
        self.ranks = [
            actor.remote(rank, world_size, address, port, model_path, attn_backend, dict(trainer_cfg), micro_batches_per_rank, seed)
            for rank in range(world_size)
        ]
        ray.get([r.__ray_ready__.remote() for r in self.ranks])

    def shard(self, items: list) -> list[list]:
        """Contiguous split of ``items`` over the ranks (equal counts required by DeepSpeed)."""
        if len(items) % self.world_size:
            raise ValueError(f"{len(items)} micro-batches do not split evenly over {self.world_size} trainer ranks")
        n = len(items) // self.world_size
        return [items[i * n : (i + 1) * n] for i in range(self.world_size)]

    def train_step(self, batches: list, loss_fn, normaliser: float, extras: list[dict]) -> list[dict]:
        return ray.get([
            rank.train_step.remote(b, loss_fn, normaliser, e)
            for rank, b, e in zip(self.ranks, self.shard(batches), self.shard(extras))
        ])

    def logprobs(self, batches: list) -> list:
        shards = ray.get([rank.logprobs.remote(b) for rank, b in zip(self.ranks, self.shard(batches))])
        return [lp for shard in shards for lp in shard]

    def full_state_dict(self) -> dict:
        return ray.get([rank.full_state_dict.remote() for rank in self.ranks])[0]

    def shutdown(self) -> None:
        for rank in self.ranks:
            ray.kill(rank)
