"""bench/faults.py's CPU-cheap parts: argument defaults and overrides, the per-step metric merge of a resumed run's
metrics.jsonl (the last record of each step wins), and the comparison that decides PASS/FAIL."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.bench.bench_modules import load_bench


def test_defaults_and_overrides_after_the_options(tmp_path):
    bench = load_bench("faults")
    args = bench.parse_args(["kill", "--recipe", "sft", "--out", str(tmp_path), "trainer.num_threads=1"])
    assert (args.steps, args.kills, args.overrides) == (300, 3, ["trainer.num_threads=1"])
    assert bench.parse_args(["soak", "--out", str(tmp_path)]).steps == 300
    sft = bench.experiment(args, tmp_path / "run")
    assert "curriculum.phases.0.steps=150" in sft and "curriculum.phases.1.steps=150" in sft
    assert sft[-2:] == [f"run_dir={tmp_path / 'run'}", "trainer.num_threads=1"]  # the user's overrides last


def _run(directory: Path, records: list[dict], weight: float) -> Path:
    (directory / "checkpoints" / "step_2").mkdir(parents=True)
    (directory / "checkpoints" / "latest").write_text("step_2")
    save_file({"w": torch.full((2, 2), weight)}, str(directory / "checkpoints" / "step_2" / "model.safetensors"))
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


def test_a_resumed_runs_last_records_are_compared_and_timing_ignored(tmp_path):
    bench = load_bench("faults")
    reference = _run(tmp_path / "ref", [{"step": 1, "train/loss": 2.0, "perf/s": 1.0}, {"step": 2, "train/loss": 1.5}], 0.5)
    # killed after step 2's metrics were written but before its checkpoint: step 2 ran again after the resume
    faulted = _run(tmp_path / "got", [{"step": 1, "train/loss": 2.0, "perf/s": 9.0}, {"step": 2, "train/loss": 9.9},
                                      {"step": 2, "train/loss": 1.5, "perf/s": 3.0}], 0.5)
    assert bench.last_step(faulted) == 2
    assert bench.compare(reference, faulted) == (0.0, 0.0, [])
    off = _run(tmp_path / "off", [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5 + 3e-3}], 0.5 + 1e-3)
    metric_diff, weight_diff, missing = bench.compare(reference, off)
    assert abs(metric_diff - 2e-3) < 1e-9 and abs(weight_diff - 1e-3) < 1e-6 and missing == []
    short = _run(tmp_path / "short", [{"step": 1, "train/loss": 2.0}], 0.5)
    assert bench.compare(reference, short)[2] == ["step 2"]


def test_soak_warm_up_ends_after_the_one_time_events(tmp_path):
    bench = load_bench("faults")
    rl = bench.parse_args(["soak", "--recipe", "rl", "--out", str(tmp_path)])
    sft = bench.parse_args(["soak", "--recipe", "sft", "--out", str(tmp_path)])
    assert bench.warm_up_step(rl) == 50  # first evaluation and save at step 50
    assert bench.warm_up_step(sft) == 1500  # the second phase of 3,000 steps starts after step 1500
    short = bench.parse_args(["soak", "--recipe", "sft", "--steps", "400", "--out", str(tmp_path)])
    assert bench.warm_up_step(short) == 300  # the last quarter is always measured


def test_soak_report_growth_trend_and_open_files():
    bench = load_bench("faults")
    samples = [(step, {"driver": {"rss_mib": 100.0 + 0.002 * step, "open_files": 30},
                       "trainer": {"rss_mib": 200.0, "open_files": 12 if step < 300 else 13}})
               for step in (100, 200, 300, 400)]
    report, ok = bench.soak_report(samples, max_growth=5.0)
    driver, trainer = report
    assert abs(driver["growth_pct"] - 100 * 0.6 / 100.2) < 1e-9  # 100.2 -> 100.8 MiB
    assert abs(driver["trend_mib_per_1k_steps"] - 2.0) < 1e-9  # 0.002 MiB per step
    assert trainer["growth_pct"] == 0.0 and (trainer["open_files_warm"], trainer["open_files_end"]) == (12, 13)
    assert not ok  # the trainer's open files grew
    assert bench.soak_report(samples[:2], max_growth=5.0)[1]
    assert not bench.soak_report(samples, max_growth=0.5)[1]
    assert bench.slope([(0, 1.0), (10, 1.0)]) == 0.0 and bench.slope([(5, 3.0)]) == 0.0


def test_soak_reads_the_drivers_object_references(tmp_path):
    bench = load_bench("faults")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "train/loss": 1.0, "perf/ray_object_refs": 4}, {"step": 1, "eval/accuracy": 0.5},
        {"step": 2, "train/loss": 1.0, "perf/ray_object_refs": 5.0}]))
    assert bench.object_refs(tmp_path) == {1: 4, 2: 5}
