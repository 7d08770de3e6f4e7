"""A Hydra multirun sweep through the submitit launcher (configs/hydra/launcher/local.yaml: the local twin of
hydra/launcher=slurm): two tiny SFT runs, each its own submitit job, each with its own run directory."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO
from train.models.model_zoo import resolve_model_path


def test_two_point_sweep_runs_as_two_submitit_jobs(tmp_path, compose):
    sweep_dir = tmp_path / "sweep"
    model_path = resolve_model_path(compose(["experiment=quickstart"]).model)  # the test-size model, built once
    command = [sys.executable, "-m", "train", "-m", "hydra/launcher=local", "experiment=quickstart", "trainer.lr=1e-3,2e-3",
               "trainer.max_steps=2", "trainer.warmup_steps=0", "trainer.eval_every=0", "trainer.save_every=0",
               "trainer.resume=null", "trainer.row_tokens=512", "trainer.rows_per_micro_batch=1",
               "data.synthetic.train.num_samples=100", "data.synthetic.eval.num_samples=2", "rollout.max_new_tokens=4",
               "logger.mode=disabled", f"model.path={model_path}", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, "WANDB_SILENT": "true"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, lr in (("0", 1e-3), ("1", 2e-3)):
        run_dir = sweep_dir / job
        rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
        assert [r["train/lr"] for r in rows if r["step"] == 1 and "train/lr" in r] == [lr]  # no warmup: the peak lr
        assert (run_dir / "checkpoints" / "step_2" / "config.json").exists()
    # submitit's per-job folders (pickled job, logs): the points ran as launcher jobs, not in this process.
    logs = sorted(p.name for p in sweep_dir.glob(".submitit/*/*_log.out"))
    assert len(logs) == 2, logs
