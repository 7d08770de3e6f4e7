"""slurm/train.sbatch and slurm/ray_cluster.sh without SLURM: fake `srun`, `scontrol`, `ray` and `python` on PATH
record what the script asks of them in one log, in order. Checked: node list expansion, head address given to
the workers and to the experiment, Ray started on every node and stopped on all of them after success, failure,
SIGTERM and the pre-time-limit USR1 (which also requeues), SFT on the same Ray cluster, and early failures."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NODELIST = "node[01-03],gpu7"
NODES = ["node01", "node02", "node03", "gpu7"]

FAKES = {
    # `srun [options] -w NODE command...`: `hostname --ip-address` answers "fe80::<i> 10.0.0.<i>" for the i-th node;
    # anything else runs as its own process group (the job step) with SLURMD_NODENAME=NODE. Signals as real srun
    # treats them: SIGUSR2 is forwarded, SIGTERM kills the step with SIGKILL.
    "srun": r"""#!/bin/bash
node=""
while [[ $1 == -* ]]; do
    if [[ $1 == -w ]]; then node=$2; shift; fi
    shift
done
echo "srun $node: $*" >> "$FAKE_LOG"
if [[ $1 == hostname ]]; then
    i=0; for n in $FAKE_NODES; do i=$((i + 1)); [[ $n == "$node" ]] && echo "fe80::$i 10.0.0.$i"; done
    exit 0
fi
step=""
trap '[[ -n $step ]] && kill -USR2 $step' USR2
trap '[[ -n $step ]] && echo "srun $node: step killed" >> "$FAKE_LOG" && kill -KILL -- -$step' TERM
SLURMD_NODENAME=$node setsid "$@" &
step=$!
while kill -0 $step 2>/dev/null; do wait $step; done
wait $step
status=$?
kill -KILL -- -$step 2>/dev/null  # as slurmstepd does: nothing of a finished step outlives it
exit $status
""",
    # Expands bracket ranges with zero padding as SLURM does: node[01-03],gpu7 -> node01 node02 node03 gpu7.
    "scontrol": r"""#!/usr/bin/env python3
import os, re, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write("scontrol " + " ".join(sys.argv[1:]) + "\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", sys.argv[3]):
        m = re.fullmatch(r"(.*)\[(\d+)-(\d+)\]", part)
        names = [f"{m[1]}{i:0{len(m[2])}d}" for i in range(int(m[2]), int(m[3]) + 1)] if m else [part]
        print("\n".join(names))
""",
    # `ray start --block` stays up until SIGTERM; a node has "joined" while its marker file exists.
    "ray": r"""#!/bin/bash
node=${SLURMD_NODENAME:-?}
echo "ray $node: $*" >> "$FAKE_LOG"
[[ " $FAKE_RAY_FAILS " == *" $node "* ]] && exit 1
trap 'rm -f "$FAKE_DIR/joined.$node"; echo "ray stopped $node" >> "$FAKE_LOG"; exit 0' TERM
[[ " $FAKE_RAY_NEVER_JOINS " == *" $node "* ]] || touch "$FAKE_DIR/joined.$node"
while true; do sleep 0.05; done
""",
    # The config query, the alive-nodes check (-c) and the training run (FAKE_TRAIN: ok | fail | hang).
    "python": r"""#!/bin/bash
if [[ $1 == -c ]]; then
    alive=$(ls "$FAKE_DIR" | grep -c '^joined\.')
    echo "alive-check $3: $alive" >> "$FAKE_LOG"
    echo "$alive"
    exit 0
fi
if [[ " $* " == *" --cfg job -p algorithm.recipe "* ]]; then
    [[ $FAKE_RECIPE == bad ]] && { echo "Could not override 'nope'" >&2; exit 1; }
    echo "$FAKE_RECIPE"; exit 0
fi
echo "train: ${*:3}" >> "$FAKE_LOG"
case $FAKE_TRAIN in
    ok) exit 0 ;;
    fail) exit 3 ;;
    hang) trap 'echo "train got TERM" >> "$FAKE_LOG"; exit 143' TERM
          while true; do sleep 0.05; done ;;
esac
""",
}


@pytest.fixture
def fake(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    log.touch()
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path),
        "FAKE_LOG": str(log), "FAKE_DIR": str(tmp_path), "FAKE_NODES": " ".join(NODES),
        "FAKE_RECIPE": "rl", "FAKE_TRAIN": "ok", "FAKE_RAY_NEVER_JOINS": "", "FAKE_RAY_FAILS": "",
        "PYTHON": str(bin_dir / "python"), "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": NODELIST, "SLURM_CPUS_ON_NODE": "16", "SLURM_GPUS_ON_NODE": "8",
        "RAY_POLL_INTERVAL": "0.05", "RAY_STOP_TIMEOUT": "5",
    }

    class Fake:
        def start(self, *args, **extra_env):
            return subprocess.Popen(["bash", str(REPO / "slurm" / "train.sbatch"), *args], env={**env, **extra_env},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def run(self, *args, **extra_env):
            proc = self.start(*args, **extra_env)
            out, _ = proc.communicate(timeout=30)
            return proc.returncode, out

        def lines(self):
            return log.read_text().splitlines()

    return Fake()


def test_rl_job_starts_ray_on_every_node_runs_against_the_head_and_stops_ray(fake):
    code, out = fake.run("experiment=quickstart_rl", "trainer.max_steps=2")
    assert code == 0, out
    lines = fake.lines()
    assert lines[0] == f"scontrol show hostnames {NODELIST}"
    assert "srun node01: hostname --ip-address" in lines
    head = "ray node01: start --head --block --node-ip-address=10.0.0.1 --port=6379 --temp-dir=/tmp/ray_4242 --num-cpus=16 --num-gpus=8"
    workers = [f"ray {n}: start --block --address=10.0.0.1:6379 --num-cpus=16 --num-gpus=8" for n in NODES[1:]]
    train = "train: run_dir=runs/slurm/4242 experiment=quickstart_rl trainer.max_steps=2 cluster.ray_address=10.0.0.1:6379"
    assert head in lines and all(w in lines for w in workers)
    # Workers start only after the head is up; training only after all four nodes are up.
    first_worker = min(lines.index(w) for w in workers)
    assert "alive-check 10.0.0.1:6379: 1" in lines[:first_worker]
    assert lines.index("alive-check 10.0.0.1:6379: 4") < lines.index(train)
    assert "4 of 4 nodes joined 10.0.0.1:6379" in out
    stops = [i for i, line in enumerate(lines) if line.startswith("ray stopped")]
    assert sorted(lines[i].split()[-1] for i in stops) == sorted(NODES) and min(stops) > lines.index(train)
    assert not any(line.startswith("scontrol requeue") for line in lines)


def test_failed_training_stops_ray_and_keeps_the_exit_status(fake):
    code, out = fake.run("experiment=quickstart_rl", FAKE_TRAIN="fail")
    assert code == 3, out
    assert sorted(l.split()[-1] for l in fake.lines() if l.startswith("ray stopped")) == sorted(NODES)


@pytest.mark.parametrize("sig, code, requeued", [(signal.SIGTERM, 143, False), (signal.SIGUSR1, 0, True)], ids=["TERM", "USR1"])
def test_signal_stops_training_then_ray_and_usr1_requeues(fake, sig, code, requeued):
    proc = fake.start("experiment=quickstart_rl", FAKE_TRAIN="hang")
    deadline = time.time() + 20
    while not any(l.startswith("train:") for l in fake.lines()):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(sig)  # to the batch shell only, as `--signal=B:...` and preemption do
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == code, out
    lines = fake.lines()
    stops = [i for i, l in enumerate(lines) if l.startswith("ray stopped")]
    assert len(stops) == len(NODES) and lines.index("train got TERM") < min(stops)
    if requeued:
        assert lines[-1] == "scontrol requeue 4242" and max(stops) < len(lines) - 1
    else:
        assert not any(l.startswith("scontrol requeue") for l in lines)


def test_sft_job_runs_its_ranks_on_the_ray_cluster_of_every_node(fake):
    code, out = fake.run("experiment=quickstart", "run_dir=runs/mine", FAKE_RECIPE="sft", RUN_DIR="runs/x")
    assert code == 0, out
    lines = fake.lines()
    train = "train: run_dir=runs/x experiment=quickstart run_dir=runs/mine cluster.ray_address=10.0.0.1:6379"  # the last run_dir wins
    assert train in lines and "4 of 4 nodes joined 10.0.0.1:6379" in out
    assert lines.index("alive-check 10.0.0.1:6379: 4") < lines.index(train)
    stops = [i for i, line in enumerate(lines) if line.startswith("ray stopped")]
    assert sorted(lines[i].split()[-1] for i in stops) == sorted(NODES) and min(stops) > lines.index(train)


def test_a_node_that_never_joins_fails_the_job_before_training_and_stops_the_others(fake):
    code, out = fake.run("experiment=quickstart_rl", FAKE_RAY_NEVER_JOINS="gpu7", RAY_JOIN_TIMEOUT="2")
    assert code == 1
    assert re.search(r"only [0-3] of 4 nodes joined 10.0.0.1:6379 within 2s \(raise RAY_JOIN_TIMEOUT", out), out
    lines = fake.lines()
    assert not any(l.startswith("train:") for l in lines)
    assert sorted(l.split()[-1] for l in lines if l.startswith("ray stopped")) == sorted(NODES)


def test_a_ray_start_that_exits_fails_fast(fake):
    start = time.time()
    code, out = fake.run("experiment=quickstart_rl", FAKE_RAY_FAILS="node03", RAY_JOIN_TIMEOUT="60")
    # fast = well before the 60 s join timeout it would otherwise wait out (the margin absorbs a loaded machine)
    assert code == 1 and "exited early" in out and time.time() - start < 45
    assert not any(l.startswith("train:") for l in fake.lines())


def test_a_bad_override_stops_before_any_node_is_touched(fake):
    code, out = fake.run("experiment=quickstart_rl", "nope=1", FAKE_RECIPE="bad")
    assert code == 2 and "does not compose" in out
    assert fake.lines() == []


def test_single_node_rl_job_runs_against_its_head(fake):
    code, out = fake.run("experiment=quickstart_rl", SLURM_JOB_NODELIST="node01")
    assert code == 0, out
    lines = fake.lines()
    assert sum(l.startswith("ray node01: start --head") for l in lines) == 1 and not any("--address=" in l for l in lines)
    assert "train: run_dir=runs/slurm/4242 experiment=quickstart_rl cluster.ray_address=10.0.0.1:6379" in lines
    assert lines[-1] == "ray stopped node01"
