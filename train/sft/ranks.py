"""SFT on the trainer ranks: the driver's handle on the ``TrainerGroup`` (train/workers/actors.py) that RL uses too.

Every optimizer step takes ``world_size * grad_accum`` packed micro-batches from the phase's stream (kept in the
driver, so its position is the data position of a checkpoint) and gives rank r the r-th contiguous share of
``grad_accum``: over an epoch every packed row is trained once, on exactly one rank. The loss is normalised by the
loss tokens of the whole step (train/sft/loss.py), so the update does not depend on how the step is split.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf

from train.run.threads import sft_thread_plan
from train.sft.curriculum import Phase, micro_batches_per_step
from train.sft.loss import TokenCrossEntropy, loss_tokens


def rank_threads(cfg) -> int | None:
    """Torch threads per CPU rank: ``trainer.num_threads``, else the cores of a local Ray split over the ranks (so
    2 ranks on 2 cores do not oversubscribe); None on GPU or a remote cluster (Ray's per-actor setting)."""
    return sft_thread_plan(cfg).trainer  # train/run/threads.py


class SFTRanks:
    """``trainer.world_size`` DeepSpeed ranks training one model on SFT steps.

    ``rank_options``: Ray options per rank (default: train/workers/placement.py for ``cluster.placement``; tests pin
    ranks to nodes). ``loss_class(step_loss_tokens)`` builds the loss of a step (default ``TokenCrossEntropy``)."""

    def __init__(self, cfg, model_path: str, rank_options: list[dict] | None = None, loss_class=TokenCrossEntropy):
        from train.workers.actors import TrainerGroup
        from train.workers.placement import plan

        t = cfg.trainer
        self.world_size, self.grad_accum, self.loss_class = int(t.world_size), int(t.grad_accum), loss_class
        self.trainer_cfg = t  # trainer.sequence_parallel_size ranks share each micro-batch (micro_batches_per_step)
        self.placement = None
        if rank_options is None:
            self.placement = plan(cfg.cluster.placement, torch.cuda.is_available(), self.world_size, 0)
            rank_options = self.placement.trainer
        # the lr schedule comes per phase (start_phase); the group's own one-step default is replaced at once
        # model.lora travels with the trainer settings (train/workers/policy_trainer.py wraps the model)
        trainer_cfg = {**OmegaConf.to_container(t, resolve=True), "max_steps": 1,
                       "lora": OmegaConf.to_container(cfg.model.lora, resolve=True) if cfg.model.get("lora") else None}
        try:
            self.group = TrainerGroup(self.world_size, str(model_path), cfg.model.attn_backend, trainer_cfg,
                                      self.grad_accum, cfg.seed, rank_options, num_threads=rank_threads(cfg),
                                      timeout_s=cfg.cluster.get("actor_timeout_s", 1800))
        except BaseException:
            self.remove_placement()
            raise

    @property
    def nodes(self) -> list[str | None]:
        """The Ray node address of each rank (rank 0 first)."""
        return [c["node"] for c in self.group.connections]

    def start_phase(self, phase: Phase, step: int, saved_schedule: dict | None) -> int:
        """Freeze the phase's parameters and start its lr schedule at global ``step`` (at ``saved_schedule`` when
        resuming inside the phase). Returns the number of frozen parameter tensors."""
        frozen = self.group.apply_to_model(phase.freezing())
        self.group.start_lr_schedule(**phase.schedule(), state=saved_schedule,
                                     steps_done=0 if saved_schedule is not None else step - phase.start)
        return frozen

    def step(self, phase: Phase) -> dict:
        """One optimizer step on the next ``world_size / SP * grad_accum`` micro-batches of ``phase``'s stream."""
        start = time.perf_counter()
        batches = [phase.stream.next() for _ in range(micro_batches_per_step(self.trainer_cfg))]  # dp * grad_accum
        step_loss_tokens = sum(loss_tokens(b) for b in batches)
        stats = self.group.train_step(batches, self.loss_class(step_loss_tokens), [{} for _ in batches])
        lr = self.group.advance_lr_schedule()
        tokens = sum(b.num_tokens for b in batches)
        return {
            "train/loss": sum(s["loss_sum"] for s in stats),  # each micro-batch's share of the step's mean
            "train/grad_norm": stats[0]["grad_norm"],
            "train/skipped_steps": stats[0]["skipped"],  # a non-finite loss or gradient: not applied, lr held
            "train/lr": lr,
            "train/loss_tokens": step_loss_tokens,
            "perf/tokens": tokens,
            "perf/tokens_per_s": tokens / (time.perf_counter() - start),
            "perf/padding_fraction": sum(b.num_padding for b in batches) / tokens,
        }

    def weights(self) -> dict[str, torch.Tensor]:
        """The full weights (gathered from ZeRO-3 shards)."""
        return self.group.full_state_dict()

    def lr_schedule_state(self) -> dict:
        return self.group.lr_schedule_state()

    def save_state(self, directory: Path) -> None:
        self.group.save_state(str(directory))

    def load_state(self, directory: Path, step: int) -> None:
        if not (Path(directory) / "deepspeed").is_dir():
            raise FileNotFoundError(
                f"trainer.resume: {directory} has no DeepSpeed state (deepspeed/): it was written before SFT ran on "
                "trainer ranks; start a fresh run from it with model.path=<that dir> trainer.resume=null")
        self.group.load_state(str(directory), step)

    def remove_placement(self) -> None:
        if self.placement is not None:
            self.placement.remove()
            self.placement = None

    def shutdown(self) -> None:
        self.group.shutdown()
        self.remove_placement()


@contextmanager
def start_ranks(cfg, model_path: str, rank_options: list[dict] | None = None, loss_class=TokenCrossEntropy):
    """Start Ray (train/workers/ray_session.py) and the ranks; stop the ranks on leaving, by any path."""
    from train.workers.ray_session import init_ray

    init_ray(cfg.cluster.get("ray_address"), cfg.cluster.get("ray_num_cpus"))
    ranks = SFTRanks(cfg, model_path, rank_options, loss_class)
    try:
        yield ranks
    finally:
        ranks.shutdown()
