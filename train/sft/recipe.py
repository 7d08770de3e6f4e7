"""SFT recipe: packed chats -> cross-entropy on assistant tokens -> AdamW on DeepSpeed ZeRO trainer ranks,
evaluated on held-out problems.

Reads top to bottom: check config, plan the phases (data streams + lr schedules; a plain run is one phase, a
``curriculum`` several: train/sft/curriculum.py), start the ``trainer.world_size`` ranks (train/sft/ranks.py: the
trainer component RL uses too) from the model or the checkpoint, (resume), train with periodic eval and
checkpoints, final eval and checkpoint. The driver keeps the data streams, a copy of the model for evaluation and
HF-format checkpoints, and the run's logger. Components live in data_pipelines/ and train/.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from train.models.evaluate import evaluate
from train.models.model_zoo import load_model, load_tokenizer, resolve_model_path
from train.models.runtime import resolve_device, resolve_precision, seed_everything
from train.run import checkpoint
from train.run.config_checks import check_sft
from train.run.run_logger import RunLogger
from train.sft import curriculum
from train.sft.loss import TokenCrossEntropy
from train.sft.ranks import start_ranks

log = logging.getLogger(__name__)


def run(cfg: DictConfig, rank_options: list[dict] | None = None, loss_class=TokenCrossEntropy) -> dict:
    """Train ``cfg``. ``rank_options`` (Ray options per trainer rank) and ``loss_class``: hooks for tests."""
    with ExitStack() as stack:
        return _run(cfg, stack, rank_options, loss_class)


def _run(cfg: DictConfig, stack: ExitStack, rank_options, loss_class) -> dict:
    check_sft(cfg)
    curriculum.check(cfg)
    run_dir = Path(cfg.run_dir)
    device = resolve_device(cfg.cluster.device)
    dtype = resolve_precision(cfg.trainer.precision, device)
    if cfg.cluster.num_threads:
        torch.set_num_threads(cfg.cluster.num_threads)
    seed_everything(cfg.seed)

    # Data first: bad rows fail here, before the model is built. A plain run is one phase of data + trainer.
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path)
    phases, data_stats = curriculum.plan(cfg, tokenizer)
    eval_sets = curriculum.eval_sets(cfg)
    num_steps = phases[-1].end
    is_curriculum = cfg.get("curriculum") is not None

    resume_from = checkpoint.resolve_resume(cfg.trainer.resume, run_dir)
    # the driver's copy: evaluation and HF-format checkpoints, with the ranks' weights copied in before each
    model = load_model(resume_from or model_path, cfg.model.attn_backend, torch.float32, device)
    curriculum.check_freezing(model, phases)  # a pattern that matches no parameter fails before the ranks start
    ranks = stack.enter_context(start_ranks(cfg, resume_from or model_path, rank_options, loss_class))
    step, saved_schedule = 0, None
    if resume_from is not None:
        state = checkpoint.load_trainer_state(resume_from)
        step = state["step"]
        phase = curriculum.phase_at(phases, step)
        if state.get("phase", 0) != phase.index:
            raise ValueError(f"checkpoint {resume_from} is in phase {state.get('phase', 0)} but curriculum.phases puts "
                             f"step {step} in phase {phase.index}: the curriculum changed since; resume with the same config")
        ranks.load_state(resume_from, step)
        phase.stream.load_state_dict(state["data"])
        saved_schedule = state.get("lr_schedule")  # None at a phase boundary: the phase starts its own
        checkpoint.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (phase %d %s)", resume_from, step, phase.index, phase.name)

    logger = RunLogger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True))
    logger.log(data_stats, step)
    log.info(
        "SFT: %s, %d params, %d steps, %d rank(s) ZeRO-%d on nodes %s, device=%s dtype=%s backend=%s",
        ", ".join(f"phase {p.index} {p.name!r}: {len(p.stream.documents)} documents {p.mix or ''} steps {p.start}-{p.end}"
                  for p in phases),
        sum(p.numel() for p in model.parameters()), num_steps, cfg.trainer.world_size, cfg.trainer.zero_stage, ranks.nodes, device,
        dtype, cfg.model.attn_backend,
    )

    def save():
        phase = curriculum.phase_at(phases, step)  # the phase of the next step, and its data position
        schedule_state = ranks.lr_schedule_state() if phase_end and step < phase_end else None
        model.load_state_dict(ranks.weights(), strict=False)  # parameters; tied weights and buffers stay
        return checkpoint.save(
            run_dir, step, model, tokenizer,
            {"lr_schedule": schedule_state, "phase": phase.index, "data": phase.stream.state_dict()},
            cfg.trainer.keep_last, write_extra=ranks.save_state,  # DeepSpeed state: optimizer shards of every rank
        )

    def run_eval(phase_end: int | None = None) -> dict:
        """Every held-out set; at the end of a curriculum phase also under ``eval/phase{k}/...``."""
        result = {}
        model.load_state_dict(ranks.weights(), strict=False)  # parameters; tied weights and buffers stay
        for name, rows in eval_sets.items():
            scores = evaluate(model, tokenizer, rows, cfg.rollout.max_new_tokens, cfg.rollout.batch_size)
            samples = scores.pop("samples")
            prefix = f"eval/{name}/" if name else "eval/"
            scores = {prefix + key.removeprefix("eval/"): value for key, value in scores.items()}
            logger.log_samples(prefix + "samples", samples, step)
            result.update(scores)
        if phase_end is not None:
            result.update({f"eval/phase{phase_end}/" + key.removeprefix("eval/"): value for key, value in list(result.items())})
        logger.log(result, step)
        return result

    history, eval_result, phase, phase_end = [], {}, None, 0
    progress = tqdm(total=num_steps, initial=step, desc="sft", dynamic_ncols=True)
    while step < num_steps:
        if phase is None or step >= phase.end:
            phase = curriculum.phase_at(phases, step)
            frozen = ranks.start_phase(phase, step, saved_schedule)
            phase_end, saved_schedule = phase.end, None
            if is_curriculum:
                progress.write(f"step {step}: phase {phase.index} {phase.name!r} ({phase.steps} steps, peak lr "
                               f"{phase.lr:g}, {frozen} parameter tensors frozen)")
        metrics = ranks.step(phase)
        step += 1
        metrics["train/epoch"] = phase.stream.epoch + phase.stream.index / max(phase.stream.batches_per_epoch(), 1)
        if is_curriculum:
            metrics["train/phase"] = phase.index
            metrics[f"train/phase{phase.index}/loss"] = metrics["train/loss"]
        history.append(metrics["train/loss"])
        logger.log(metrics, step)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}")
        at_phase_end = is_curriculum and step == phase.end
        if eval_sets and step < num_steps and (at_phase_end or (cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0)):
            eval_result = run_eval(phase.index if at_phase_end else None)
            progress.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in eval_result.items() if k.endswith("accuracy")))
        if cfg.trainer.save_every and step % cfg.trainer.save_every == 0 and step < num_steps:
            save()
    progress.close()

    eval_result = run_eval(phases[-1].index if is_curriculum else None) if eval_sets else {}
    final = save()
    logger.finish()
    summary = {
        "step": step,
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
