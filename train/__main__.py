"""Entry point: ``python -m train experiment=quickstart [key=value ...]``.

Composes the Hydra config (configs/), picks the recipe named by ``algorithm.recipe`` and runs it.
``--cfg job`` prints the composed config; ``--help`` lists the config groups. Bad input (a config check, a bad
data row, a missing file, a config node whose target refuses its values, a trainer failure) prints one line naming
the problem and exits with status 1; ``HYDRA_FULL_ERROR=1`` shows the traceback instead. Any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import hydra
from omegaconf import DictConfig

from train.run import errors
from train.run.config_checks import ConfigError
from train.run.errors import run_hydra_job

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
RECIPES = {"sft": "train.sft.recipe", "rl": "train.rl.recipe"}


def run(cfg: DictConfig) -> dict:
    """Run the recipe of ``cfg.algorithm.recipe`` (the programmatic entry point; tests call this)."""
    recipe = cfg.algorithm.get("recipe")
    if recipe not in RECIPES:
        raise ConfigError(f"algorithm.recipe={recipe!r} is not one of {sorted(RECIPES)}")
    return importlib.import_module(RECIPES[recipe]).run(cfg)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_hydra_job(run, cfg, recipe_error_types())


def recipe_error_types() -> tuple:
    """The recipes' own input errors (besides train/run/errors.py's common ones)."""
    from train.sft.curriculum import CurriculumError
    from train.workers.actors import TrainerFailure

    return (CurriculumError, TrainerFailure)


def is_user_error(err: BaseException) -> bool:
    """Bad input rather than a bug (train/run/errors.py), the recipes' errors included."""
    return errors.is_user_error(err, recipe_error_types())


user_message = errors.user_message


if __name__ == "__main__":
    main()
