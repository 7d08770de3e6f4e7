"""Entry point: ``python -m train experiment=quickstart [key=value ...]``.

Composes the Hydra config (configs/), picks the recipe named by ``algorithm.recipe`` and runs it.
``--cfg job`` prints the composed config; ``--help`` lists the config groups. Bad input (a config check, a bad
data row, a missing file, a config node whose target refuses its values, a trainer failure) prints one line naming
the problem and exits with status 1; ``HYDRA_FULL_ERROR=1`` shows the traceback instead. Any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, open_dict

from train.run.config_checks import ConfigError

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
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if cfg.run_dir is None:
        with open_dict(cfg):
            cfg.run_dir = HydraConfig.get().runtime.output_dir
    try:
        run(cfg)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is bad input
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not is_user_error(err):
            raise
        sys.exit(f"error: {user_message(err)} (traceback: rerun with HYDRA_FULL_ERROR=1)")


def is_user_error(err: BaseException) -> bool:
    """Bad input rather than a bug: the project's input errors, a missing file, an OmegaConf key error, or a
    value refused by a config node's ``_target_`` while Hydra instantiated it."""
    from omegaconf.errors import OmegaConfBaseException

    from data_pipelines.chat_format import ChatTemplateError
    from data_pipelines.validation import DataValidationError
    from rewards.registry import RewardConfigError, RewardFunctionError
    from train.run.checkpoint import CheckpointWriteError
    from train.sft.curriculum import CurriculumError
    from train.workers.actors import TrainerFailure

    if isinstance(err, InstantiationException):
        return isinstance(err.__cause__, (ValueError, KeyError, TypeError))
    return isinstance(err, (ConfigError, DataValidationError, ChatTemplateError, RewardConfigError, RewardFunctionError,
                            CurriculumError, TrainerFailure, CheckpointWriteError, FileNotFoundError,
                            OmegaConfBaseException))


def user_message(err: BaseException) -> str:
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        return user_message(err.__cause__)
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)  # str(KeyError) adds quotes
    return " ".join(str(message).split())  # one line


if __name__ == "__main__":
    main()
