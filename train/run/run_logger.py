"""Run logging: metrics to ``{run_dir}/metrics.jsonl`` always, and to Weights & Biases unless disabled.

W&B runs offline by default (``logger.mode=offline``; ``online`` when the user sets it, with the API key taken
from the environment by wandb itself, never from the config). The run id is stored in the run directory so a
resumed run (same run_dir, e.g. a requeued SLURM job) continues the same W&B run.

Every W&B chart uses ``global_step`` (our training step) as its x-axis instead of wandb's internal step: a run
resumed from an earlier checkpoint logs steps wandb has already seen, which wandb would drop if they were
passed as its own (monotonic) step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

STEP_KEY = "global_step"
METRIC_PREFIXES = ("train", "rollout", "reward", "eval", "perf", "data")


class RunLogger:
    def __init__(self, logger_cfg, run_dir, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_every = int(logger_cfg.get("samples_every") or 0)
        self.wandb_run = None
        self.wandb_dir: str | None = None  # the W&B run directory (offline runs: `wandb sync` it)
        if logger_cfg.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={logger_cfg.mode!r} must be offline, online or disabled")
        api_key = os.environ.get("WANDB_API_KEY")
        if api_key and config is not None and api_key in json.dumps(config, default=str):
            # The config is written to the W&B run, checkpoints and Hydra's dumps: a key in it would leak.
            raise ValueError("the W&B API key appears in the run config: remove it from the config and the command "
                             "line; set only the WANDB_API_KEY environment variable")
        if logger_cfg.mode != "disabled":
            import wandb

            id_file = self.run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id)
            self.wandb_run = wandb.init(
                project=logger_cfg.project,
                entity=logger_cfg.get("entity"),
                group=logger_cfg.get("group"),
                name=logger_cfg.get("name"),
                tags=list(logger_cfg.get("tags") or []),
                mode=logger_cfg.mode,
                dir=str(self.run_dir),
                id=run_id,
                resume="allow",
                config=config,
            )
            self.wandb_run.define_metric(STEP_KEY)
            for prefix in METRIC_PREFIXES:
                self.wandb_run.define_metric(f"{prefix}/*", step_metric=STEP_KEY)
            self.wandb_dir = str(Path(self.wandb_run.dir).parent)

    def log(self, metrics: dict, step: int) -> None:
        """Finite scalars of ``metrics`` at ``step``; anything else (strings, NaN) is left out."""
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        self._write(scalars, step)

    def samples_due(self, step: int) -> bool:
        """Whether ``step`` is one of the steps that log a samples table (``logger.samples_every``; 0 = never)."""
        return self.samples_every > 0 and step % self.samples_every == 0

    def log_samples(self, key: str, samples: list[dict], step: int) -> None:
        """A table of sample responses (prompt, response, ...) under ``key``; also kept in samples.jsonl."""
        if not samples:
            return
        with (self.run_dir / "samples.jsonl").open("a") as f:
            for sample in samples:
                f.write(json.dumps({"step": step, "table": key, **sample}) + "\n")
        if self.wandb_run is not None:
            import wandb

            columns = list(samples[0])
            table = wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])
            self.wandb_run.log({key: table, STEP_KEY: step})

    def log_histogram(self, key: str, values, step: int) -> None:
        """A W&B histogram of ``values`` (list, array or tensor) under ``key``; its summary statistics
        ``{key}_min/_mean/_max/_p50/_p90`` go to metrics.jsonl (and W&B) so runs without W&B keep them."""
        import numpy as np

        array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64).ravel()
        array = array[np.isfinite(array)]
        if array.size == 0:
            return
        stats = {f"{key}_min": array.min(), f"{key}_mean": array.mean(), f"{key}_max": array.max(),
                 f"{key}_p50": np.percentile(array, 50), f"{key}_p90": np.percentile(array, 90)}
        extra = {}
        if self.wandb_run is not None:
            import wandb

            extra = {key: wandb.Histogram(array)}
        self._write({k: float(v) for k, v in stats.items()}, step, extra)

    def _write(self, scalars: dict, step: int, wandb_only: dict | None = None) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({**scalars, **(wandb_only or {}), STEP_KEY: step})

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
