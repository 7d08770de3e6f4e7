"""One-line errors for the command-line entry points (``python -m train``, ``python -m train.eval``).

Bad input (a config check, a bad data row, a missing file, a config node whose target refuses its values) prints
one line naming the problem and exits with status 1; ``HYDRA_FULL_ERROR=1`` shows the traceback instead. Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

from hydra.errors import InstantiationException


def is_user_error(err: BaseException, extra_types: tuple = ()) -> bool:
    """Bad input rather than a bug: the project's input errors (plus an entry point's ``extra_types``), a missing
    file, an OmegaConf key error, or a value refused by a config node's ``_target_`` while Hydra instantiated it."""
    from omegaconf.errors import OmegaConfBaseException

    from data_pipelines.chat_format import ChatTemplateError
    from data_pipelines.validation import DataValidationError
    from rewards.registry import RewardConfigError, RewardFunctionError
    from train.run.checkpoint import CheckpointWriteError
    from train.run.config_checks import ConfigError

    if isinstance(err, InstantiationException):
        return isinstance(err.__cause__, (ValueError, KeyError, TypeError))
    return isinstance(err, (ConfigError, DataValidationError, ChatTemplateError, RewardConfigError, RewardFunctionError,
                            CheckpointWriteError, FileNotFoundError, OmegaConfBaseException, *extra_types))


def user_message(err: BaseException) -> str:
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        return user_message(err.__cause__)
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)  # str(KeyError) adds quotes
    return " ".join(str(message).split())  # one line


def run_or_exit(fn, cfg, extra_types: tuple = ()):
    """``fn(cfg)``; bad input exits with ``error: <one line>`` (status 1), anything else is re-raised."""
    try:
        return fn(cfg)
    except Exception as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not is_user_error(err, extra_types):
            raise
        sys.exit(f"error: {user_message(err)} (traceback: rerun with HYDRA_FULL_ERROR=1)")


def run_hydra_job(fn, cfg, extra_types: tuple = ()):
    """The body of a ``@hydra.main`` entry point: quiet HTTP logging, ``run_dir`` defaulting to Hydra's output
    directory (``runs/<date>/<time>/``), then ``run_or_exit(fn, cfg, extra_types)``."""
    import logging

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    logging.getLogger("httpx").setLevel(logging.WARNING)
    if cfg.run_dir is None:
        with open_dict(cfg):
            cfg.run_dir = HydraConfig.get().runtime.output_dir
    return run_or_exit(fn, cfg, extra_types)
