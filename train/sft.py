"""SFT recipe: packed chats -> cross-entropy on assistant tokens -> AdamW, evaluated on held-out problems.

Reads top to bottom: check config, build/load model and data, (resume), train with periodic eval and
checkpoints, final eval and checkpoint. Components live in data_pipelines/ and train/.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from data_pipelines.batching import PackedBatchStream
from data_pipelines.loading import load_split, tokenize_rows
from train import checkpoint
from train.config_checks import check_sft
from train.evaluate import evaluate
from train.forward import sft_loss_sum
from train.model_zoo import load_model, load_tokenizer, resolve_model_path
from train.run_logger import RunLogger
from train.runtime import autocast, resolve_device, resolve_precision, seed_everything

log = logging.getLogger(__name__)


def total_steps(trainer_cfg, stream: PackedBatchStream) -> int:
    if trainer_cfg.max_steps is not None:
        return int(trainer_cfg.max_steps)
    return max(1, math.ceil(trainer_cfg.epochs * stream.batches_per_epoch() / trainer_cfg.grad_accum))


def build_optimizer(model, trainer_cfg, num_steps: int):
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=trainer_cfg.lr, betas=tuple(trainer_cfg.betas), weight_decay=trainer_cfg.weight_decay
    )
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, trainer_cfg.warmup_steps, num_steps, min_lr_rate=trainer_cfg.min_lr_ratio
    )
    return optimizer, scheduler


def train_step(model, stream, optimizer, scheduler, cfg, device, dtype) -> dict:
    """One optimizer step over ``grad_accum`` packed micro-batches; the loss is the mean over all their
    loss tokens, exactly as if they were one batch."""
    batches = [stream.next() for _ in range(cfg.trainer.grad_accum)]
    loss_tokens = sum(b.num_loss_tokens for b in batches)
    total_loss = 0.0
    for batch in batches:
        with autocast(device, dtype):
            loss_sum, _ = sft_loss_sum(model, batch.to(device), cfg.model.attn_backend)
        (loss_sum / max(loss_tokens, 1)).backward()
        total_loss += loss_sum.item()
    max_norm = cfg.trainer.max_grad_norm or float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(b.num_tokens for b in batches)
    return {
        "train/loss": total_loss / max(loss_tokens, 1),
        "train/grad_norm": grad_norm,
        "train/lr": optimizer.param_groups[0]["lr"],
        "train/loss_tokens": loss_tokens,
        "perf/tokens": tokens,
        "perf/padding_fraction": sum(b.num_padding for b in batches) / tokens,
    }


def run(cfg: DictConfig) -> dict:
    check_sft(cfg)
    run_dir = Path(cfg.run_dir)
    device = resolve_device(cfg.cluster.device)
    dtype = resolve_precision(cfg.trainer.precision, device)
    if cfg.cluster.num_threads:
        torch.set_num_threads(cfg.cluster.num_threads)
    seed_everything(cfg.seed)

    # Data first: bad rows fail here, before the model is built.
    train_rows = load_split(cfg.data, "train")
    eval_rows = load_split(cfg.data, "eval") if cfg.data.source == "synthetic" or cfg.data.eval_files else []
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path)
    documents, dropped = tokenize_rows(
        train_rows, tokenizer, cfg.data.max_seq_len, cfg.data.system_prompt, cfg.data.get("multi_turn", "single_pass")
    )
    stream = PackedBatchStream(
        documents, cfg.trainer.row_tokens, cfg.trainer.rows_per_micro_batch, tokenizer.pad_token_id, cfg.seed
    )
    num_steps = total_steps(cfg.trainer, stream)

    resume_from = checkpoint.resolve_resume(cfg.trainer.resume, run_dir)
    model = load_model(resume_from or model_path, cfg.model.attn_backend, torch.float32, device)
    model.train()
    optimizer, scheduler = build_optimizer(model, cfg.trainer, num_steps)
    step = 0
    if resume_from is not None:
        state = checkpoint.load_trainer_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])
        step = state["step"]
        log.info("resumed from %s at step %d", resume_from, step)

    logger = RunLogger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True))
    logger.log({"data/train_rows": len(train_rows), "data/dropped_for_length": dropped, "data/documents": len(documents)}, step)
    log.info(
        "SFT: %d documents (%d dropped for length), %d params, %d steps, device=%s dtype=%s backend=%s",
        len(documents), dropped, sum(p.numel() for p in model.parameters()), num_steps, device, dtype, cfg.model.attn_backend,
    )

    def save():
        return checkpoint.save(
            run_dir, step, model, tokenizer,
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "data": stream.state_dict()},
            cfg.trainer.keep_last,
        )

    def run_eval() -> dict:
        if not eval_rows:
            return {}
        result = evaluate(model, tokenizer, eval_rows, cfg.rollout.max_new_tokens, cfg.rollout.batch_size)
        logger.log_samples("eval/samples", result.pop("samples"), step)
        logger.log(result, step)
        return result

    history, eval_result = [], {}
    progress = tqdm(total=num_steps, initial=step, desc="sft", dynamic_ncols=True)
    while step < num_steps:
        start = time.perf_counter()
        metrics = train_step(model, stream, optimizer, scheduler, cfg, device, dtype)
        step += 1
        metrics["perf/tokens_per_s"] = metrics["perf/tokens"] / (time.perf_counter() - start)
        metrics["train/epoch"] = stream.epoch + stream.index / max(stream.batches_per_epoch(), 1)
        history.append(metrics["train/loss"])
        logger.log(metrics, step)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}")
        if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step < num_steps:
            eval_result = run_eval()
            progress.write(f"step {step}: eval accuracy {eval_result.get('eval/accuracy', float('nan')):.3f}")
        if cfg.trainer.save_every and step % cfg.trainer.save_every == 0 and step < num_steps:
            save()
    progress.close()

    eval_result = run_eval()
    final = save()
    logger.finish()
    summary = {
        "step": step,
        "losses": history,
        "checkpoint": str(final),
        "run_dir": str(run_dir),
        "wandb_dir": logger.wandb_dir,
        **{k: v for k, v in eval_result.items() if k.startswith("eval/")},
    }
    print(f"checkpoint: {final}")
    print(f"metrics:    {logger.metrics_path}")
    if logger.wandb_dir:
        print(f"wandb run:  {logger.wandb_dir} (offline: `wandb sync {logger.wandb_dir}`)" if cfg.logger.mode == "offline" else f"wandb run: {logger.wandb_dir}")
    if "eval/accuracy" in eval_result:
        print(f"held-out exact match: {eval_result['eval/accuracy']:.3f} on {len(eval_rows)} problems")
    return summary
