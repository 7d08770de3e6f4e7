"""Run logging: metrics to ``{run_dir}/metrics.jsonl`` always, and to Weights & Biases unless disabled.

W&B runs offline by default (``logger.mode=offline``; ``online`` when the user sets it, with the API key taken
from the environment by wandb itself, never from the config). The run id is stored in the run directory so a
resumed run continues the same W&B run.
"""

from __future__ import annotations

import json
import secrets
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


class RunLogger:
    def __init__(self, logger_cfg, run_dir, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.wandb_dir: str | None = None  # the W&B run directory (offline runs: `wandb sync` it)
        if logger_cfg.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={logger_cfg.mode!r} must be offline, online or disabled")
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
            self.wandb_dir = str(Path(self.wandb_run.dir).parent)

    def log(self, metrics: dict, step: int) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

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
            self.wandb_run.log({key: wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])}, step=step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
