"""Fault runs too slow for CI: kill -9 of the driver at random moments, then resume; memory soak over long runs.

    python bench/faults.py kill --recipe rl                    # RL of a model that learns, on-policy, 3 kills
    python bench/faults.py kill --recipe rl --async-steps 1    # the same with one-step off-policy rollouts
    python bench/faults.py kill --recipe sft --steps 300       # SFT with the easy-to-hard curriculum
    python bench/faults.py soak --recipe rl --steps 300        # resident memory and open files every 10 steps
    python bench/faults.py soak --recipe sft --steps 3000
    python bench/faults.py head --recipe rl --steps 6          # the Ray head killed after step 2, then resume

kill: runs the experiment once uninterrupted (the reference) and once with ``trainer.resume=auto`` killed by
SIGKILL of the driver process at ``--kills`` moments (seeded by ``--seed``): each a random delay (up to 1.5 of
the reference's seconds per step) after a random step was logged, so a kill may land anywhere: start-up, a step,
evaluation, a checkpoint save; each time restarted with the same command until it finishes. It then compares the per-step metrics (the last record of each step; timing
keys ``perf/*`` excluded) and the final weights with the reference's and prints the largest differences; the exit
status is 1 when either exceeds ``--tolerance``. RL starts from a short SFT of the tiny model (``--sft-steps``,
built once under ``--out``) so that rewards are not all zero, with Bingo's dynamic length schedule and the
difficulty band sampler on. Processes the killed driver started (Ray, actors) are killed with it: a killed
driver's Ray session is gone, as on a cluster node that lost its driver.

soak: runs the experiment and, every ``--every`` steps (read from metrics.jsonl), samples the resident memory
(RSS) and open files of the driver and of every process it started (Ray actors by their names). Warm-up lasts until
every one-time event has happened once (the first evaluation and save; SFT: the last curriculum phase's start). It
prints, per process, RSS after warm-up and at the end, the growth in percent, the fitted trend (MiB per 1,000 steps)
and the open-file counts, and the driver's Ray object references (``perf/ray_object_refs``); writes them to
``<out>/soak_<recipe>.json`` and plots RSS over steps to ``<out>/soak_<recipe>.png``. The exit status is 1 when some
process grew by more than ``--max-growth`` percent after warm-up, its open files grew, or the object references did.

head: an RL run on a Ray head started here (``cluster.ray_address``) loses the head (every process of the node
SIGKILLed) after ``--kill-after`` checkpointed steps; prints how the driver ended, checks the last checkpoint
loads and resumes it on a fresh head to the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# RL: Bingo's dynamic length schedule and the difficulty band sampler on; SFT: the two-phase curriculum.
RL_OVERRIDES = ["experiment=quickstart_rl_bingo", "sampler=band", "data.synthetic.eval.num_samples=16",
                "rollout.eval_samples=0", "logger.mode=disabled"]
SFT_OVERRIDES = ["experiment=curriculum_quickstart", "curriculum.eval.easy.synthetic.num_samples=20",
                 "curriculum.eval.hard.synthetic.num_samples=20", "logger.mode=disabled"]
# kill: frequent checkpoints and evaluations, so kills land in saves and evals too; soak: a long run's settings
EVERY = {("kill", "rl"): (4, 2), ("kill", "sft"): (50, 25), ("soak", "rl"): (50, 50), ("soak", "sft"): (500, 500),
         ("head", "rl"): (0, 1)}


def experiment(args, run_dir: Path) -> list[str]:
    """The ``python -m train`` overrides of the run under test."""
    eval_every, save_every = EVERY[(args.mode, args.recipe)]
    if args.recipe == "rl":
        extra = [f"model.path={sft_model(args)}", f"trainer.max_steps={args.steps}",
                 f"rollout.async_steps={args.async_steps}"]
        base = RL_OVERRIDES
    else:
        half = args.steps // 2
        base, extra = SFT_OVERRIDES, [f"curriculum.phases.0.steps={half}", f"curriculum.phases.1.steps={args.steps - half}"]
    return [*base, *extra, f"trainer.eval_every={eval_every}", f"trainer.save_every={save_every}",
            f"run_dir={run_dir}", *args.overrides]


def sft_model(args) -> Path:
    """A short SFT of the tiny model (built once under --out): an RL starting point whose rewards are not all 0."""
    run_dir = Path(args.out) / f"sft_{args.sft_steps}"
    if not (run_dir / "checkpoints" / "latest").exists():
        run_command(["experiment=sft_for_rl", f"trainer.max_steps={args.sft_steps}", "trainer.eval_every=0",
                     "trainer.save_every=0", "logger.mode=disabled", f"run_dir={run_dir}"], check=True)
    return run_dir


def run_command(overrides: list[str], check: bool = False, log: Path | None = None) -> subprocess.Popen:
    """Start ``python -m train overrides`` in its own session (so every process it starts can be found)."""
    out = open(log, "a") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([PYTHON, "-m", "train", *overrides], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    if check and proc.wait() != 0:
        raise SystemExit(f"python -m train {' '.join(overrides)} failed (status {proc.returncode})")
    return proc


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver first (the fault), then whatever it had started."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def step_metrics(run_dir: Path) -> dict[int, dict]:
    """The last record of each step in metrics.jsonl, merged per step; left out: timing (``perf/*``) and the data
    statistics every start logs at the step it starts from (``data/*``)."""
    merged: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        step = record.pop("step")
        merged.setdefault(step, {}).update({k: v for k, v in record.items() if not k.startswith(("perf/", "data/"))})
    return merged


def last_step(run_dir: Path) -> int:
    """The highest step in metrics.jsonl (0 before the first)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines()[-50:] if line.strip()]
    return max(steps, default=0)


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    return {k: v.double() for f in sorted(latest.glob("*.safetensors")) for k, v in load_file(f).items()}


def compare(reference: Path, faulted: Path) -> tuple[float, float, list[str]]:
    """(largest metric difference, largest weight difference, keys that differ in presence)."""
    ref, got = step_metrics(reference), step_metrics(faulted)
    missing = sorted({f"step {s}" for s in ref} ^ {f"step {s}" for s in got})
    metric_diff = 0.0
    for step in set(ref) & set(got):
        for key in set(ref[step]) | set(got[step]):
            if key not in ref[step] or key not in got[step]:
                missing.append(f"step {step} {key}")
                continue
            a, b = ref[step][key], got[step][key]
            metric_diff = max(metric_diff, abs(a - b) / max(1.0, abs(a)))
    w_ref, w_got = final_weights(reference), final_weights(faulted)
    weight_diff = max((w_ref[k] - w_got[k]).abs().max().item() for k in w_ref)
    return metric_diff, weight_diff, missing


def kill_run(args) -> int:
    out = Path(args.out) / f"kill_{args.recipe}_async{args.async_steps}_seed{args.seed}"
    reference, faulted = out / "reference", out / "faulted"
    start = time.monotonic()
    if not (reference / "checkpoints" / "latest").exists():
        run_command(experiment(args, reference) + ["trainer.resume=null"], check=True, log=out / "reference.log")
    wall = time.monotonic() - start
    rng = random.Random(args.seed)
    per_step = wall / args.steps
    # a kill lands `delay` seconds after step `after` was logged (after 0: counted from the start, so start-up too):
    # inside a step, an evaluation or a checkpoint save, wherever that falls
    kills = sorted((rng.randrange(args.steps), rng.uniform(0.0, 1.5) * per_step) for _ in range(args.kills))
    print(f"reference: {wall:.0f} s ({per_step:.1f} s/step with start-up); kills "
          + ", ".join(f"{delay:.1f} s after step {after}" for after, delay in kills))
    events = []
    for after, delay in kills:
        before = last_step(faulted)
        proc = run_command(experiment(args, faulted) + ["trainer.resume=auto"], log=out / "faulted.log")
        while proc.poll() is None and last_step(faulted) < after:
            time.sleep(0.05)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        if proc.poll() is None:
            kill_tree(proc)
            events.append(f"killed {delay:.1f} s after step {max(after, before)} (steps {before} -> {last_step(faulted)})")
        else:
            events.append(f"finished before the kill after step {after}")
        print(events[-1])
    proc = run_command(experiment(args, faulted) + ["trainer.resume=auto"], log=out / "faulted.log")
    if proc.wait() != 0:
        print(f"the resumed run failed: see {out / 'faulted.log'}")
        return 1
    metric_diff, weight_diff, missing = compare(reference, faulted)
    ok = metric_diff <= args.tolerance and weight_diff <= args.tolerance and not missing
    summary = {"recipe": args.recipe, "async_steps": args.async_steps, "steps": args.steps, "events": events,
               "max_metric_rel_diff": metric_diff, "max_weight_abs_diff": weight_diff, "missing": missing[:20],
               "tolerance": args.tolerance, "pass": ok}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"largest metric difference (relative) {metric_diff:.3g}, largest final weight difference {weight_diff:.3g}, "
          f"{len(missing)} missing records: {'PASS' if ok else 'FAIL'} (tolerance {args.tolerance:g})")
    return 0 if ok else 1


def process_name(proc: psutil.Process, driver: int) -> str:
    if proc.pid == driver:
        return "driver"
    try:
        title = " ".join(proc.cmdline())[:80]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    # an actor's title carries the method it runs (ray::RolloutWorker.generate): keyed by the actor class alone
    return title.split(" ")[0].split(".")[0] if title.startswith("ray::") else proc.name()


def sample(driver: psutil.Process) -> dict[str, dict]:
    """RSS (MiB) and open files of the driver and its descendants, by name (numbered when repeated)."""
    rows: dict[str, dict] = {}
    for proc in [driver, *driver.children(recursive=True)]:
        try:
            name = process_name(proc, driver.pid)
            key, n = name, 1
            while key in rows:
                n += 1
                key = f"{name}#{n}"
            rows[key] = {"rss_mib": proc.memory_info().rss / 2**20, "open_files": proc.num_fds()}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rows


def soak_run(args) -> int:
    out = Path(args.out)
    run_dir = out / f"soak_{args.recipe}"
    proc = run_command(experiment(args, run_dir) + ["trainer.resume=null"], log=out / f"soak_{args.recipe}.log")
    driver = psutil.Process(proc.pid)
    samples: list[tuple[int, dict]] = []
    next_step = args.every
    while proc.poll() is None:
        step = last_step(run_dir)
        if step >= next_step:
            samples.append((step, sample(driver)))
            next_step = (step // args.every + 1) * args.every
        time.sleep(0.2)
    if proc.returncode != 0 or len(samples) < 4:
        print(f"the run failed or was too short (status {proc.returncode}, {len(samples)} samples): see the log")
        return 1
    warm_step = warm_up_step(args)
    after = [s for s in samples if s[0] > warm_step] or samples[-2:]
    warm, end = after[0], after[-1]
    report, ok = soak_report(after, args.max_growth)
    refs = object_refs(run_dir)
    refs_warm, refs_end = refs.get(warm[0]), refs.get(end[0])
    refs_grew = refs_warm is None or refs_end is None or refs_end > refs_warm
    ok &= not refs_grew
    print(f"{args.recipe}: {end[0]} steps, RSS sampled every {args.every} steps; warm-up until step {warm_step} (the "
          f"first evaluation and save{', the last phase' if args.recipe == 'sft' else ''}), measured from step {warm[0]}")
    print(f"{'process':<28} {'RSS warm MiB':>12} {'RSS end MiB':>12} {'growth %':>9} {'MiB/1k steps':>12} {'files':>9}")
    for row in report:
        print(f"{row['process']:<28} {row['rss_warm_mib']:12.1f} {row['rss_end_mib']:12.1f} {row['growth_pct']:9.2f} "
              f"{row['trend_mib_per_1k_steps']:12.2f} {row['open_files_warm']:>4}->{row['open_files_end']:<4}")
    print(f"object references held by the driver (perf/ray_object_refs): {refs_warm} at step {warm[0]}, "
          f"{refs_end} at step {end[0]}")
    (out / f"soak_{args.recipe}.json").write_text(json.dumps(
        {"samples": samples, "warm_up_step": warm_step, "report": report,
         "ray_object_refs": {"warm": refs_warm, "end": refs_end, "by_step": refs}}, indent=1))
    plot(samples, out / f"soak_{args.recipe}.png", args.recipe)
    print(f"{'PASS' if ok else 'FAIL'}: growth after warm-up < {args.max_growth:g}%, no open-file growth, "
          "no growth in the driver's Ray object references")
    return 0 if ok else 1


def warm_up_step(args) -> int:
    """The step by which every one-time event of a soak run has happened once: the first evaluation and checkpoint
    save and, for SFT, the start of the curriculum's last phase (its data and stream are built then). Memory they
    allocate is paid once, not growth; the last quarter of the run is always measured."""
    eval_every, save_every = EVERY[("soak", args.recipe)]
    events = [eval_every, save_every] + ([args.steps - args.steps // 2] if args.recipe == "sft" else [])
    return min(max(events), args.steps * 3 // 4)


def soak_report(samples: list[tuple[int, dict]], max_growth: float) -> tuple[list[dict], bool]:
    """Per process of the first sample: RSS at the first and last of ``samples``, the growth in percent, the
    least-squares trend (MiB per 1,000 steps) and open files; ok when every growth is below ``max_growth`` and no
    process's open files grew."""
    first, last = samples[0][1], samples[-1][1]
    report, ok = [], True
    for name, at_warm in first.items():
        if name not in last:
            continue
        at_end = last[name]
        points = [(step, rows[name]["rss_mib"]) for step, rows in samples if name in rows]
        growth = 100.0 * (at_end["rss_mib"] - at_warm["rss_mib"]) / at_warm["rss_mib"]
        files_grew = at_end["open_files"] > at_warm["open_files"]
        ok &= growth < max_growth and not files_grew
        report.append({"process": name, "rss_warm_mib": at_warm["rss_mib"], "rss_end_mib": at_end["rss_mib"],
                       "growth_pct": growth, "trend_mib_per_1k_steps": 1000.0 * slope(points),
                       "open_files_warm": at_warm["open_files"], "open_files_end": at_end["open_files"]})
    return report, ok


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope dy/dx of ``points`` (0 for fewer than 2 distinct x)."""
    n = len(points)
    mean_x, mean_y = sum(p[0] for p in points) / max(n, 1), sum(p[1] for p in points) / max(n, 1)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0


def object_refs(run_dir: Path) -> dict[int, int]:
    """``perf/ray_object_refs`` (object references the driver holds) by step, from metrics.jsonl."""
    path, refs = run_dir / "metrics.jsonl", {}
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        if "perf/ray_object_refs" in record:
            refs[record["step"]] = int(record["perf/ray_object_refs"])
    return refs


def head_run(args) -> int:
    """Lose the Ray head mid-run: RL on a one-node Ray cluster started here (tests/loopback_cluster.py's node_a, a
    loopback address) with ``cluster.ray_address``; once ``--kill-after`` steps are checkpointed every process of
    the head node is SIGKILLed (GCS, raylet, the actors on it). Reports how the driver ends (seconds, status, its
    last log lines), checks that the last checkpoint loads, then starts a fresh head and resumes with
    ``trainer.resume=auto`` to the end."""
    import shutil
    import tempfile

    sys.path.insert(0, str(REPO))
    from tests.loopback_cluster import (
        NODES,
        LoopbackCluster,
        _listening,
        _start_node,
        _stop,
        free_port,
    )
    from train.run import checkpoint

    out = Path(args.out)
    run_dir, log = out / "head_rl", out / "head_rl.log"
    shutil.rmtree(run_dir, ignore_errors=True)
    log.unlink(missing_ok=True)
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the driver (a child) joins the cluster started here

    def start_head() -> LoopbackCluster:
        ip = NODES["node_a"]
        port = free_port(ip)
        cluster = LoopbackCluster(f"{ip}:{port}", tempfile.mkdtemp(prefix="rphead_", dir="/tmp"))
        _start_node(cluster, "node_a", port)
        deadline = time.monotonic() + 300
        while not _listening(ip, port):
            if time.monotonic() > deadline:
                raise SystemExit(f"the head did not start:\n{cluster.log('node_a')}")
            time.sleep(0.5)
        return cluster

    overrides = experiment(args, run_dir) + ["trainer.resume=null"]
    cluster = start_head()
    proc = run_command(overrides + [f"cluster.ray_address={cluster.address}"], log=log)
    while proc.poll() is None and not (checkpoint.latest(run_dir) and last_step(run_dir) >= args.kill_after):
        time.sleep(0.2)
    if proc.poll() is not None:
        print(f"the run ended (status {proc.returncode}) before step {args.kill_after} was checkpointed: see {log}")
        _stop(cluster)
        return 1
    step, saved = last_step(run_dir), checkpoint.latest(run_dir)
    head = psutil.Process(cluster.processes["node_a"].pid)
    node = [head, *head.children(recursive=True)]
    for process in node:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    killed = time.monotonic()
    print(f"killed the Ray head ({len(node)} processes) after step {step}; last checkpoint {saved}")
    try:
        status = proc.wait(timeout=args.head_wait)
        ended = f"the driver exited {time.monotonic() - killed:.0f} s later with status {status}"
    except subprocess.TimeoutExpired:
        ended = f"the driver was still running {args.head_wait} s later (killed now)"
        kill_tree(proc)
    _stop(cluster)
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-6:]
    print(ended + "; its last log lines:\n  " + "\n  ".join(line[:300] for line in tail))
    last = checkpoint.latest(run_dir)
    state = checkpoint.load_trainer_state(last)
    print(f"last checkpoint {last} (step {state['step']}) loads")
    cluster = start_head()
    try:
        resumed = run_command([*overrides[:-1], "trainer.resume=auto", f"cluster.ray_address={cluster.address}"],
                              log=log).wait()
    finally:
        _stop(cluster)
    final = last_step(run_dir)
    print(f"resumed on a fresh head: status {resumed}, reached step {final} of {args.steps}")
    return 0 if resumed == 0 and final == args.steps else 1


def plot(samples, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for _, rows in samples for name in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        points = [(step, rows[name]["rss_mib"]) for step, rows in samples if name in rows]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set(xlabel="step", ylabel="RSS (MiB)", title=f"{title} soak: resident memory per process")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["kill", "soak", "head"])
    parser.add_argument("--recipe", choices=["rl", "sft"], default="rl")
    parser.add_argument("--steps", type=int, default=None, help="steps of the run (kill: rl 12, sft 300; soak: rl 300, "
                                                                "sft 3000)")
    parser.add_argument("--async-steps", type=int, choices=[0, 1], default=0, help="RL: rollout.async_steps")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    parser.add_argument("--sft-steps", type=int, default=600, help="RL: SFT steps of the starting model")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="kill: largest metric/weight difference allowed")
    parser.add_argument("--every", type=int, default=10, help="soak: steps between samples")
    parser.add_argument("--max-growth", type=float, default=5.0, help="soak: RSS growth (%%) allowed after warm-up")
    parser.add_argument("--kill-after", type=int, default=2, help="head: steps checkpointed before the head is killed")
    parser.add_argument("--head-wait", type=float, default=300, help="head: seconds the driver is given to end")
    parser.add_argument("--out", default="runs/faults")
    parser.add_argument("overrides", nargs="*", help="extra python -m train overrides")
    args = parser.parse_intermixed_args(argv)  # python -m train overrides may follow the options
    if args.steps is None:
        args.steps = {("kill", "rl"): 12, ("kill", "sft"): 300, ("soak", "rl"): 300, ("soak", "sft"): 3000,
                      ("head", "rl"): 6, ("head", "sft"): 6}[
            (args.mode, args.recipe)]
    if args.steps < 1 or args.kills < 0 or not math.isfinite(args.tolerance):
        parser.error("--steps must be >= 1, --kills >= 0, --tolerance finite")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode == "kill":
        (Path(args.out) / f"kill_{args.recipe}_async{args.async_steps}_seed{args.seed}").mkdir(parents=True,
                                                                                            exist_ok=True)
        return kill_run(args)
    if args.mode == "head":
        if args.recipe != "rl":
            raise SystemExit("head: only --recipe rl")
        return head_run(args)
    return soak_run(args)


if __name__ == "__main__":
    sys.exit(main())
