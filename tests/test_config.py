"""Config composition, overrides, and early failures that name the key."""

import subprocess
import sys

import pytest
from hydra.errors import MissingConfigException

from tests.conftest import REPO
from train.__main__ import run
from train.run.config_checks import ConfigError, check_sft


def test_quickstart_composes_with_overrides(compose):
    cfg = compose(["experiment=quickstart", "trainer.lr=1e-4", "data.synthetic.train.digits=3"])
    assert cfg.algorithm.name == "sft" and cfg.algorithm.recipe == "sft"
    assert cfg.trainer.lr == 1e-4
    assert cfg.data.synthetic.train.digits == 3
    assert cfg.trainer.max_steps == 1500  # set by the experiment file
    for group in ("model", "data", "algorithm", "trainer", "rollout", "logger", "cluster"):
        assert group in cfg
    check_sft(cfg)


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.lr=-1", "trainer.lr"),
        ("trainer.grad_accum=0", "trainer.grad_accum"),
        ("trainer.row_tokens=100", "trainer.row_tokens"),
        ("model.attn_backend=flash", "model.attn_backend"),  # flash-attn on a CPU machine
        ("model.attn_backend=xformers", "model.attn_backend"),
        ("logger.mode=sometimes", "logger.mode"),
        ("cluster.device=tpu", "cluster.device"),
        ("trainer.precision=fp8", "trainer.precision"),
    ],
)
def test_bad_value_fails_before_training_naming_the_key(compose, override, key):
    cfg = compose(["experiment=quickstart", override])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        run(cfg)


def test_missing_data_file_names_the_key(compose, tmp_path):
    cfg = compose(["data=files", f"data.train_files=[{tmp_path}/nope.jsonl]"])
    with pytest.raises(FileNotFoundError, match=r"data\.train_files.*nope\.jsonl"):
        run(cfg)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_required_value_left_unset(compose):
    cfg = compose(["data=files"])
    with pytest.raises(ConfigError, match=r"data\.train_files"):
        run(cfg)


def test_unknown_algorithm_is_rejected(compose):
    with pytest.raises(MissingConfigException, match="algorithm"):
        compose(["algorithm=does_not_exist"])


def test_cli_prints_config_and_rejects_bad_value():
    out = subprocess.run(
        [sys.executable, "-m", "train", "experiment=quickstart", "trainer.lr=1e-4", "--cfg", "job"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "lr: 0.0001" in out.stdout and "recipe: sft" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "train", "experiment=quickstart", "trainer.lr=-1", "logger.mode=disabled", "run_dir=/tmp/_never"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode != 0
    assert "trainer.lr=-1 must be > 0" in bad.stderr
