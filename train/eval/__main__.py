"""``python -m train.eval model.path=CHECKPOINT_OR_RUN_DIR data=... [key=value ...]`` (configs/eval.yaml).

Bad input prints one line naming the key (train/run/errors.py, as ``python -m train``)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from train.eval.recipe import run
from train.run.errors import run_or_exit

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if cfg.run_dir is None:
        with open_dict(cfg):
            cfg.run_dir = HydraConfig.get().runtime.output_dir
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
