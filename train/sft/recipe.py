"""SFT recipe: packed chats -> cross-entropy on assistant tokens -> AdamW on DeepSpeed ZeRO trainer ranks,
evaluated on held-out problems.

Reads top to bottom: check config, plan the phases (data streams + lr schedules; a plain run is one phase, a
``curriculum`` several: train/sft/curriculum.py), start the ``trainer.world_size`` ranks (train/sft/ranks.py: the
trainer component RL uses too) from the model or the checkpoint, (resume), train with periodic eval and
checkpoints, final eval and checkpoint. The driver keeps the data streams, a copy of the model for evaluation and
HF-format checkpoints (``SFTRun``), and the run's logger. Components live in data_pipelines/ and train/.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from train.models.evaluate import evaluate
from train.models.lora import lora_enabled
from train.models.model_zoo import load_model, load_tokenizer, resolve_model_path
from train.models.runtime import resolve_device, resolve_precision, seed_everything
from train.run import checkpoint
from train.run.config_checks import check_fault_limits, check_lora_targets, check_sft
from train.run.run_logger import RunLogger
from train.sft import curriculum
from train.sft.curriculum import Phase
from train.sft.loss import TokenCrossEntropy
from train.sft.ranks import SFTRanks, start_ranks
from train.workers.ray_session import init_ray, object_refs_held

log = logging.getLogger(__name__)


class SFTRun:
    """One run's state in the driver: the phases, the ranks, the model copy (evaluation, checkpoints), the step."""

    def __init__(self, cfg: DictConfig, phases: list[Phase], eval_sets: dict, tokenizer, model, ranks: SFTRanks):
        self.cfg, self.phases, self.eval_sets, self.tokenizer, self.model, self.ranks = cfg, phases, eval_sets, tokenizer, model, ranks
        self.run_dir, self.is_curriculum = Path(cfg.run_dir), cfg.get("curriculum") is not None
        self.step, self.phase, self.saved_schedule = 0, None, None
        self.logger: RunLogger | None = None

    @property
    def num_steps(self) -> int:
        return self.phases[-1].end

    def resume(self, directory: Path) -> None:
        """Continue from a checkpoint: the step, the ranks' DeepSpeed state, the data position, lr schedule and RNG."""
        state = checkpoint.load_trainer_state(directory)
        self.step = state["step"]
        phase = curriculum.phase_at(self.phases, self.step)
        if state.get("phase", 0) != phase.index:
            raise ValueError(f"checkpoint {directory} is in phase {state.get('phase', 0)} but curriculum.phases puts "
                             f"step {self.step} in phase {phase.index}: the curriculum changed since; resume with the same config")
        self.ranks.load_state(directory, self.step)
        phase.stream.load_state_dict(state["data"])
        self.saved_schedule = state.get("lr_schedule")  # None at a phase boundary: the phase starts its own
        checkpoint.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (phase %d %s)", directory, self.step, phase.index, phase.name)

    def train_step(self) -> dict:
        """One optimizer step on the ranks (entering the step's phase first, if it is a new one); its metrics."""
        if self.phase is None or self.step >= self.phase.end:
            self.phase = curriculum.phase_at(self.phases, self.step)
            frozen = self.ranks.start_phase(self.phase, self.step, self.saved_schedule)
            self.saved_schedule = None
            if self.is_curriculum:
                tqdm.write(f"step {self.step}: phase {self.phase.index} {self.phase.name!r} ({self.phase.steps} steps, "
                           f"peak lr {self.phase.lr:g}, {frozen} parameter tensors frozen)")
        metrics = self.ranks.step(self.phase)
        self.step += 1
        stream = self.phase.stream
        metrics["train/epoch"] = stream.epoch + stream.index / max(stream.batches_per_epoch(), 1)
        metrics["perf/ray_object_refs"] = object_refs_held()  # flat unless refs leak (bench/faults.py soak)
        if self.is_curriculum:
            metrics["train/phase"] = self.phase.index
            metrics[f"train/phase{self.phase.index}/loss"] = metrics["train/loss"]
        return metrics

    def at_phase_end(self) -> bool:
        return self.is_curriculum and self.phase is not None and self.step == self.phase.end

    def _sync_model(self) -> None:
        self.model.load_state_dict(self.ranks.weights(), strict=False)  # parameters; tied weights and buffers stay

    def evaluate(self) -> dict:
        """Every held-out set; at the end of a curriculum phase also under ``eval/phase{k}/...``."""
        self._sync_model()
        result = {}
        for name, rows in self.eval_sets.items():
            scores = evaluate(self.model, self.tokenizer, rows, self.cfg.rollout.max_new_tokens, self.cfg.rollout.batch_size)
            samples = scores.pop("samples")
            prefix = f"eval/{name}/" if name else "eval/"
            scores = {prefix + key.removeprefix("eval/"): value for key, value in scores.items()}
            self.logger.log_samples(prefix + "samples", samples, self.step)
            result.update(scores)
        if self.at_phase_end() or (self.is_curriculum and self.step == self.num_steps):
            index = curriculum.phase_at(self.phases, self.step - 1).index
            result.update({f"eval/phase{index}/" + key.removeprefix("eval/"): value for key, value in list(result.items())})
        self.logger.log(result, self.step)
        return result

    def save(self) -> Path:
        """HF-format checkpoint + the ranks' DeepSpeed state, written atomically (train/run/checkpoint.py)."""
        phase = curriculum.phase_at(self.phases, self.step)  # the phase of the next step, and its data position
        inside = self.phase is not None and self.step < self.phase.end
        schedule_state = self.ranks.lr_schedule_state() if inside else None
        self._sync_model()
        return checkpoint.save(
            self.run_dir, self.step, self.model, self.tokenizer,
            {"lr_schedule": schedule_state, "phase": phase.index, "data": phase.stream.state_dict()},
            self.cfg.trainer.keep_last, write_extra=self.ranks.save_state,  # optimizer shards of every rank
        )


def run(cfg: DictConfig, rank_options: list[dict] | None = None, loss_class=TokenCrossEntropy) -> dict:
    """Train ``cfg``. ``rank_options`` (Ray options per trainer rank) and ``loss_class``: hooks for tests."""
    check_sft(cfg)
    check_fault_limits(cfg)
    curriculum.check(cfg)
    # here, not at the top: importing the recipe does not import Ray
    from train.workers.actors import TrainerFailure
    from train.workers.cluster_watch import ClusterWatch
    from train.workers.run_stops import BadSteps, stop_message

    run_dir = Path(cfg.run_dir)
    device = resolve_device(cfg.cluster.device)
    dtype = resolve_precision(cfg.trainer.precision, device)
    if cfg.cluster.num_threads:  # the driver's own torch work: evaluation
        torch.set_num_threads(cfg.cluster.num_threads)
    seed_everything(cfg.seed)

    # Data first: bad rows fail here, before the model is built. A plain run is one phase of data + trainer.
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path)
    phases, data_stats = curriculum.plan(cfg, tokenizer)
    eval_sets = curriculum.eval_sets(cfg)
    resume_from = checkpoint.resolve_resume(cfg.trainer.resume, run_dir)
    model = load_model(resume_from or model_path, cfg.model.attn_backend, torch.float32, device)
    curriculum.check_freezing(model, phases)  # a pattern that matches no parameter fails before the ranks start

    check_lora_targets(model, cfg.model.get("lora"))
    # under LoRA the ranks start from the base model and a resume restores the adapters from the DeepSpeed state
    # (the checkpoint's HF model is the merged one)
    rank_path = model_path if lora_enabled(cfg.model.get("lora")) else resume_from or model_path
    init_ray(cfg.cluster.get("ray_address"), cfg.cluster.get("ray_num_cpus"))
    sft = None
    with (ClusterWatch.of_this_driver(run_dir, lambda: sft.step if sft is not None else None,  # a lost Ray head
                                      cfg.cluster.get("head_timeout_s", 30)),
          start_ranks(cfg, rank_path, rank_options, loss_class) as ranks):
        sft = SFTRun(cfg, phases, eval_sets, tokenizer, model, ranks)
        if resume_from is not None:
            sft.resume(resume_from)
        logger = sft.logger = RunLogger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True))
        logger.log(data_stats, sft.step)
        log.info(
            "SFT: %s, %d params, %d steps, %d rank(s) ZeRO-%d on nodes %s, device=%s dtype=%s backend=%s",
            ", ".join(f"phase {p.index} {p.name!r}: {len(p.stream.documents)} documents {p.mix or ''} steps {p.start}-{p.end}"
                      for p in phases),
            sum(p.numel() for p in model.parameters()), sft.num_steps, cfg.trainer.world_size, cfg.trainer.zero_stage,
            ranks.nodes, device, dtype, cfg.model.attn_backend,
        )

        history, eval_result = [], {}
        bad_steps = BadSteps(cfg.trainer.get("max_bad_steps", 3))  # skipped (non-finite) steps in a row
        progress = tqdm(total=sft.num_steps, initial=sft.step, desc="sft", dynamic_ncols=True)
        while sft.step < sft.num_steps:
            try:
                metrics = sft.train_step()
                logger.log(metrics, sft.step)
                bad_steps.record(sft.step, metrics["train/skipped_steps"])
            except TrainerFailure as err:  # a rank failed, or too many non-finite steps: name the way back
                progress.close()
                logger.finish()
                raise type(err)(stop_message(err, sft.step, run_dir)) from err
            history.append(metrics["train/loss"])
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}")
            every = cfg.trainer.eval_every and sft.step % cfg.trainer.eval_every == 0
            if eval_sets and sft.step < sft.num_steps and (sft.at_phase_end() or every):
                eval_result = sft.evaluate()
                progress.write(f"step {sft.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in eval_result.items() if k.endswith("accuracy")))
            if cfg.trainer.save_every and sft.step % cfg.trainer.save_every == 0 and sft.step < sft.num_steps:
                sft.save()
        progress.close()

        eval_result = sft.evaluate() if eval_sets else {}
        final = sft.save()
        logger.finish()
        summary = {
            "step": sft.step,
            "losses": history,
            "phases": [{"name": p.name, "start": p.start, "steps": p.steps, "mix": p.mix} for p in phases],
            "checkpoint": str(final),
            "run_dir": str(run_dir),
            "trainer_nodes": ranks.nodes,
            "wandb_dir": logger.wandb_dir,
            **{k: v for k, v in eval_result.items() if k.startswith("eval/")},
        }
    print(f"checkpoint: {final}")
    print(f"metrics:    {logger.metrics_path}")
    if logger.wandb_dir:
        print(f"wandb run:  {logger.wandb_dir} (offline: `wandb sync {logger.wandb_dir}`)" if cfg.logger.mode == "offline" else f"wandb run: {logger.wandb_dir}")
    for name, rows in eval_sets.items():
        key = f"eval/{name}/accuracy" if name else "eval/accuracy"
        print(f"held-out exact match{' (' + name + ')' if name else ''}: {eval_result[key]:.3f} on {len(rows)} problems")
    return summary
