"""`python -m train`: bad input prints one line naming the problem, without a traceback, and exits non-zero."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _train(tmp_path, *overrides, full_error=False):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1" if full_error else "0", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "train", "experiment=quickstart", f"run_dir={tmp_path}/run",
                           "logger.mode=disabled", *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override,message", [
    ("trainer.grad_accum=0", "trainer.grad_accum"),                     # a config check (ConfigError)
    ("data.source=files", "data.train_files"),                           # a missing key of the data source
    ("data.source=files data.train_files=[/no/such/file.jsonl]", "/no/such/file.jsonl"),  # a missing file
])
def test_bad_input_prints_one_line_and_exits_nonzero(tmp_path, override, message):
    out = _train(tmp_path, *override.split())
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "HYDRA_FULL_ERROR=1" in errors[0], out.stderr[-2000:]


def test_full_error_shows_the_traceback(tmp_path):
    out = _train(tmp_path, "trainer.grad_accum=0", full_error=True)
    assert out.returncode == 1 and "Traceback" in out.stderr


def test_only_bad_input_is_shortened():
    """A plain ValueError or KeyError from code is a bug and keeps its traceback; input errors become one line."""
    import train.__main__ as entry
    from train.run.config_checks import ConfigError

    assert not entry.is_user_error(ValueError("not enough values to unpack"))
    assert not entry.is_user_error(KeyError("weights"))
    assert entry.is_user_error(ConfigError("trainer.lr=-1 must be > 0"))
    assert entry.user_message(KeyError("reward.bingo.reference=metadata needs\nmetadata['x']")) == \
        "reward.bingo.reference=metadata needs metadata['x']"
