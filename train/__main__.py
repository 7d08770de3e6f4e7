"""Entry point: ``python -m train experiment=quickstart [key=value ...]``.

Composes the Hydra config (configs/), picks the recipe named by ``algorithm.recipe`` and runs it.
``--cfg job`` prints the composed config; ``--help`` lists the config groups.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
RECIPES = {"sft": "train.sft.recipe", "rl": "train.rl.recipe"}


def run(cfg: DictConfig) -> dict:
    """Run the recipe of ``cfg.algorithm.recipe`` (the programmatic entry point; tests call this)."""
    recipe = cfg.algorithm.get("recipe")
    if recipe not in RECIPES:
        raise ValueError(f"algorithm.recipe={recipe!r} is not one of {sorted(RECIPES)}")
    return importlib.import_module(RECIPES[recipe]).run(cfg)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if cfg.run_dir is None:
        with open_dict(cfg):
            cfg.run_dir = HydraConfig.get().runtime.output_dir
    run(cfg)


if __name__ == "__main__":
    main()
