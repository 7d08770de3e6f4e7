"""slurm/train.sbatch on a real one-node SLURM cluster (slurm/local_cluster.sh): a tiny GRPO run through Ray ends
COMPLETED with its checkpoint and metrics and leaves no Ray process behind; a job signalled before its time limit
requeues itself and resumes. Opt-in (root, Debian's slurm-wlm and munge; about 2 + 5 minutes on 2 cores):
    RUN_SLURM_TESTS=1 .venv/bin/python -m pytest tests/slurm -m slurm -s"""

import json
import os
import socket
import subprocess

import pytest

from tests.conftest import REPO

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.environ.get("RUN_SLURM_TESTS") != "1", reason="needs a local SLURM cluster: RUN_SLURM_TESTS=1"),
]

TINY_RL = ["experiment=quickstart_rl", "model.path=null", "trainer.max_steps=2", "rollout.prompts_per_step=2", "algorithm.group_size=4",
           "rollout.max_new_tokens=12", "trainer.eval_every=0", "trainer.save_every=1", "data.synthetic.eval.num_samples=4"]


@pytest.fixture(scope="module")
def local_cluster():
    was_running = subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0
    subprocess.run(["bash", "slurm/local_cluster.sh", "start"], cwd=REPO, check=True, timeout=120)
    yield
    if not was_running:
        subprocess.run(["bash", "slurm/local_cluster.sh", "stop"], cwd=REPO, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_tiny_rl_job_completes_through_ray_and_cleans_up(local_cluster, tmp_path):
    env = {**os.environ, "RUN_DIR": str(tmp_path / "run"), "RAY_PORT": str(free_port()),
           # No dashboard: not needed here, slow to start on 2 cores, and its fixed port may be taken on a shared machine.
           "RAY_START_ARGS": "--include-dashboard=false"}
    submit = subprocess.run(["sbatch", "--parsable", "--wait", "--cpus-per-task=2", f"--output={tmp_path}/slurm-%j.out",
                             "slurm/train.sbatch", *TINY_RL], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    job_id = submit.stdout.strip().split(";")[0]
    out = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert submit.returncode == 0, out[-4000:]
    sacct = subprocess.run(["sacct", "-c", "-j", job_id, "--format=JobID,JobName,State,ExitCode,Elapsed,NodeList"],
                           capture_output=True, text=True).stdout
    print(f"\n{sacct}")
    assert f"{job_id} " in sacct and "COMPLETED" in sacct

    assert "ray_cluster: 1 of 1 nodes joined" in out and "cluster.ray_address=" in out
    assert "Connected to Ray cluster" in out  # the driver joined the job's cluster instead of starting its own
    assert "ray_cluster: stopping Ray on 1 node(s)" in out and "forcing job termination" not in out  # graceful stop
    ray_left = subprocess.run(["pgrep", "-f", f"/tmp/ray_{job_id}/"], capture_output=True, text=True).stdout
    assert ray_left == ""
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / "step_2" / "config.json").exists()
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "reward/total" in r] == [1, 2]


def test_requeued_job_resumes_from_its_checkpoint_in_the_same_run_and_wandb_run(local_cluster, tmp_path):
    """USR1 to the batch shell (what `--signal=B:USR1@180` sends before the time limit): the job stops, requeues
    itself, comes back under the same id (SLURM holds a requeued job ~2 min) and resumes. About 5 minutes."""
    import time

    run_dir = tmp_path / "run"
    env = {**os.environ, "RUN_DIR": str(run_dir), "RAY_PORT": str(free_port()), "RAY_START_ARGS": "--include-dashboard=false"}
    overrides = [o for o in TINY_RL if not o.startswith(("trainer.max_steps", "trainer.save_every"))]
    submit = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2", f"--output={tmp_path}/slurm-%j.out", "slurm/train.sbatch",
                             *overrides, "trainer.max_steps=12", "trainer.save_every=5", "trainer.eval_at_start=false"],
                            cwd=REPO, env=env, capture_output=True, text=True, check=True)
    job_id = submit.stdout.strip().split(";")[0]

    def wait_for(condition, timeout):
        deadline = time.time() + timeout
        while not condition():
            assert time.time() < deadline, (tmp_path / f"slurm-{job_id}.out").read_text()[-4000:]
            time.sleep(1)

    wait_for(lambda: (run_dir / "checkpoints" / "step_5").is_dir(), 600)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    wait_for(lambda: subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip() == "", 900)

    out = (tmp_path / f"slurm-{job_id}.out").read_text()
    sacct = subprocess.run(["sacct", "-c", "-j", job_id, "--format=JobID,JobName,State,ExitCode,Start,End,Elapsed"],
                           capture_output=True, text=True).stdout
    print(f"\n{sacct}")
    assert sacct.strip().splitlines()[-1].split()[2] == "COMPLETED"
    assert f"requeueing job {job_id}" in out and f"job {job_id} (restart 1)" in out
    assert "resumed from" in out and f"{run_dir}/checkpoints/step_" in out
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert sorted({r["step"] for r in rows if "reward/total" in r}) == list(range(1, 13))
    wandb_id = (run_dir / "wandb_id").read_text()
    assert [p.name for p in run_dir.glob("wandb/offline-run-*/run-*.wandb")] == [f"run-{wandb_id}.wandb"] * 2
