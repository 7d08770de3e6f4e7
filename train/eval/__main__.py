"""``python -m train.eval model.path=CHECKPOINT_OR_RUN_DIR data=... [key=value ...]`` (configs/eval.yaml).

Bad input prints one line naming the key (train/run/errors.py, as ``python -m train``)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from train.eval.recipe import run
from train.run.errors import run_hydra_job

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_hydra_job(run, cfg)


if __name__ == "__main__":
    main()
