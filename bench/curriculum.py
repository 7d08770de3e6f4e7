"""Curriculum SFT against its mixed baseline over seeds: held-out easy / hard accuracy, mean and spread, the gaps
and the acceptance of issue 21 (hard >= +10 points, easy no more than 2 points below, equal steps).

    python bench/curriculum.py                                  # 3 seeds x 2 arms, the held-out sets
    python bench/curriculum.py --tune --seeds 100 101 -- curriculum.phases.1.lr=1e-3   # tuning sets, other seeds
    python bench/curriculum.py --summarize runs/bench_curriculum     # only the table of finished runs

Arms: ``python -m train experiment=curriculum_quickstart`` and ``experiment=curriculum_baseline`` with
``seed=S model.tiny.seed=S`` (the training seed: data order and mix draws; and the tiny model's initial weights),
``trainer.num_threads / cluster.num_threads = --threads`` (OMP_NUM_THREADS too) and W&B off; extra Hydra
overrides after ``--`` go to both arms, ``--curriculum-set`` / ``--baseline-set`` to one. Runs go one at a time
to ``--out/{arm}/seed{S}/`` (``train.log`` holds the output); a run whose metrics.jsonl already holds its final
evaluation is read, not rerun (``--rerun`` to redo it).

Held-out sets (``curriculum.eval``: easy = 2-digit, hard = 3-digit additions, fixed seeds in the config) are never
used for tuning: ``--tune`` points the same two sets at other seeds (TUNE_EVAL_SEEDS) and writes under
``--out/tune``. Read per run from metrics.jsonl: the last record with ``eval/{set}/accuracy`` (the final
evaluation), the number of steps (records with ``train/loss``), the tokens trained (sum of ``perf/tokens``, and of
``train/loss_tokens``) and, when the run has synthesis datasets, ``data/synthesis_share`` (train/sft/curriculum.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARMS = {"curriculum": "curriculum_quickstart", "baseline": "curriculum_baseline"}
SETS = ("easy", "hard")
TUNE_EVAL_SEEDS = {"easy": 31, "hard": 32}  # tuning sets: the held-out sets' specs at other seeds
HARD_GAP, EASY_TOLERANCE = 0.10, 0.02  # acceptance: hard >= +10 points, easy >= -2 points


# -- pure part (tests/bench/test_curriculum_bench.py) ----------------------------------------------------------
def read_run(metrics_path: Path, sets=SETS) -> dict:
    """One run's figures from its metrics.jsonl: ``{set: accuracy}`` of the last evaluation of each set, ``steps``
    (records with train/loss), ``last_step``, ``tokens`` and ``loss_tokens`` (sums over steps), and
    ``synthesis_share`` (None without it). A set never evaluated is an error naming the file."""
    accuracy: dict[str, float] = {}
    steps, last_step, tokens, loss_tokens, share = 0, 0, 0.0, 0.0, None
    for line in Path(metrics_path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        last_step = max(last_step, int(record.get("step", 0)))
        if "train/loss" in record:
            steps += 1
            tokens += record.get("perf/tokens", 0.0)
            loss_tokens += record.get("train/loss_tokens", 0.0)
        for name in sets:
            if f"eval/{name}/accuracy" in record:
                accuracy[name] = record[f"eval/{name}/accuracy"]
        if "data/synthesis_share" in record:
            share = record["data/synthesis_share"]
    missing = [name for name in sets if name not in accuracy]
    if missing:
        raise ValueError(f"{metrics_path}: no eval/{missing[0]}/accuracy record; the run did not finish "
                         f"(rerun it) or curriculum.eval has no set {missing[0]!r}")
    return {**accuracy, "steps": steps, "last_step": last_step, "tokens": tokens, "loss_tokens": loss_tokens,
            "synthesis_share": share}


def spread(values: list[float]) -> dict:
    """mean, min, max and the sample standard deviation (0 for one value) of ``values``."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def summarize(runs: dict[str, list[dict]], sets=SETS) -> dict:
    """``runs``: arm -> its runs (``read_run``). Per arm and set the spread over seeds; the gaps
    curriculum - baseline of the means; steps and tokens per arm; the acceptance verdict."""
    arms = {arm: {name: spread([r[name] for r in rs]) for name in sets} for arm, rs in runs.items()}
    for arm, rs in runs.items():
        arms[arm]["steps"] = sorted({r["steps"] for r in rs})
        arms[arm]["tokens"] = statistics.fmean(r["tokens"] for r in rs)
        shares = [r["synthesis_share"] for r in rs if r.get("synthesis_share") is not None]
        arms[arm]["synthesis_share"] = statistics.fmean(shares) if shares else None
    gaps = {name: arms["curriculum"][name]["mean"] - arms["baseline"][name]["mean"] for name in sets}
    equal_steps = arms["curriculum"]["steps"] == arms["baseline"]["steps"] and len(arms["curriculum"]["steps"]) == 1
    checks = {
        "hard": gaps["hard"] >= HARD_GAP - 1e-9,
        "easy": gaps["easy"] >= -EASY_TOLERANCE - 1e-9,
        "steps": equal_steps,
    }
    return {"arms": arms, "gaps": gaps, "checks": checks, "passed": all(checks.values())}


def _cell(s: dict) -> str:
    return f"{s['mean']:.3f} [{s['min']:.2f}-{s['max']:.2f}] sd {s['std']:.3f}"


def table(summary: dict, sets=SETS) -> str:
    """The summary as a markdown table and the verdict lines."""
    arms = summary["arms"]
    lines = ["| arm | seeds | steps | tokens/run | " + " | ".join(f"{n} mean [min-max] sd" for n in sets) + " | synthesis share |",
             "|---|---|---|---|" + "---|" * len(sets) + "---|"]
    for arm, a in arms.items():
        share = "-" if a["synthesis_share"] is None else f"{a['synthesis_share']:.2f}"
        lines.append(f"| {arm} | {a[sets[0]]['n']} | {'/'.join(map(str, a['steps']))} | {a['tokens']:.0f} | "
                     + " | ".join(_cell(a[n]) for n in sets) + f" | {share} |")
    gaps, checks = summary["gaps"], summary["checks"]
    verdict = lambda ok: "PASS" if ok else "NOT MET"  # noqa: E731
    lines += ["",
              f"hard gap (curriculum - baseline): {100 * gaps['hard']:+.1f} points (need >= +{100 * HARD_GAP:.0f}): {verdict(checks['hard'])}",
              f"easy gap (curriculum - baseline): {100 * gaps['easy']:+.1f} points (need >= -{100 * EASY_TOLERANCE:.0f}): {verdict(checks['easy'])}",
              f"equal steps: {verdict(checks['steps'])}",
              f"acceptance: {verdict(summary['passed'])}"]
    return "\n".join(lines)


def arm_overrides(arm: str, seed: int, threads: int, tune: bool, extra: list[str]) -> list[str]:
    """The Hydra overrides of one run (the experiment, seed, threads, logging off, tuning sets, then ``extra``)."""
    out = [f"experiment={ARMS[arm]}", f"seed={seed}", f"model.tiny.seed={seed}", f"trainer.num_threads={threads}",
           f"cluster.num_threads={threads}", "logger.mode=disabled", "trainer.resume=null"]
    if tune:
        out += [f"curriculum.eval.{name}.synthetic.seed={s}" for name, s in TUNE_EVAL_SEEDS.items()]
    return out + list(extra)


def finished(metrics_path: Path) -> bool:
    try:
        read_run(metrics_path)
        return True
    except (OSError, ValueError):
        return False


# -- runs ---------------------------------------------------------------------------------------------------------
def run_arm(arm: str, seed: int, run_dir: Path, overrides: list[str], threads: int) -> float:
    """One training run in a child process; its wall seconds. A failed run stops the bench naming its log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "samples.jsonl"):
        (run_dir / stale).unlink(missing_ok=True)
    command = [sys.executable, "-m", "train", *overrides, f"run_dir={run_dir}", f"hydra.run.dir={run_dir}/hydra"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        code = subprocess.call(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{arm} seed {seed} failed (exit {code}): see {run_dir / 'train.log'}")
    return wall


def collect(out: Path, seeds: list[int]) -> dict[str, list[dict]]:
    return {arm: [read_run(out / arm / f"seed{seed}" / "metrics.jsonl") for seed in seeds] for arm in ARMS}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both arms (after --)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_curriculum")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run (default 1)")
    parser.add_argument("--tune", action="store_true", help="score on the tuning sets (TUNE_EVAL_SEEDS), not the held-out ones")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--curriculum-set", action="append", default=[], help="an override for the curriculum arm only")
    parser.add_argument("--baseline-set", action="append", default=[], help="an override for the baseline arm only")
    parser.add_argument("--rerun", action="store_true", help="rerun finished runs")
    parser.add_argument("--summarize", type=Path, help="only print the table of the runs under this directory")
    args = parser.parse_args(argv)

    out = args.summarize or (args.out / "tune" if args.tune else args.out)
    if args.summarize is None:
        own = {"curriculum": args.curriculum_set, "baseline": args.baseline_set}
        for seed in args.seeds:
            for arm in args.arms:
                run_dir = out / arm / f"seed{seed}"
                if finished(run_dir / "metrics.jsonl") and not args.rerun:
                    print(f"{arm} seed {seed}: finished, read from {run_dir}")
                    continue
                overrides = arm_overrides(arm, seed, args.threads, args.tune, [*args.overrides, *own[arm]])
                load = os.getloadavg()[0]
                wall = run_arm(arm, seed, run_dir, overrides, args.threads)
                scores = read_run(run_dir / "metrics.jsonl")
                print(f"{arm} seed {seed}: " + ", ".join(f"{n} {scores[n]:.3f}" for n in SETS)
                      + f", {scores['steps']} steps, {wall:.0f} s wall (load {load:.1f} at start)", flush=True)
        if set(args.arms) != set(ARMS):
            return 0
    summary = summarize(collect(out, args.seeds))
    print(f"\n{'tuning sets' if args.tune else 'held-out sets'}, seeds {args.seeds}, runs under {out}")
    print(table(summary))
    with open(out / "summary.json", "w") as f:
        json.dump({"seeds": args.seeds, "overrides": args.overrides, "curriculum_set": args.curriculum_set,
                   "baseline_set": args.baseline_set, "tune": args.tune, **summary}, f, indent=1,
                  default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
