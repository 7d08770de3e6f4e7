"""bench/curriculum.py's bookkeeping on fake metrics files: the final held-out accuracies, steps and tokens of a
run, the spread over seeds, the gaps and the acceptance verdict (golden values by hand). The runs are not tested."""

import json

import pytest

from tests.bench.bench_modules import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("curriculum")


def write_metrics(path, easy, hard, steps=4, tokens=1024, share=None):
    records = [{"step": 0, "data/add_3_digits/rows": 60.0, **({"data/synthesis_share": share} if share is not None else {})}]
    for step in range(1, steps + 1):
        records.append({"step": step, "train/loss": 1.0 / step, "perf/tokens": tokens, "train/loss_tokens": 100.0})
        if step == steps // 2:  # a phase-end evaluation: not the final one
            records.append({"step": step, "eval/easy/accuracy": 0.99, "eval/hard/accuracy": 0.01,
                            "eval/phase0/easy/accuracy": 0.99})
    records.append({"step": steps, "eval/easy/accuracy": easy, "eval/hard/accuracy": hard, "eval/easy/response_length": 30.0})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_read_run_takes_the_last_evaluation_and_sums_steps_and_tokens(bench, tmp_path):
    run = bench.read_run(write_metrics(tmp_path / "m.jsonl", easy=0.5, hard=0.25, steps=6, tokens=512, share=0.4))
    assert run == {"easy": 0.5, "hard": 0.25, "steps": 6, "last_step": 6, "tokens": 3072.0, "loss_tokens": 600.0,
                   "synthesis_share": 0.4}


def test_read_run_of_an_unfinished_run_names_the_file_and_the_set(bench, tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"step": 1, "train/loss": 1.0, "eval/easy/accuracy": 0.3}) + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl: no eval/hard/accuracy"):
        bench.read_run(path)
    assert not bench.finished(path) and not bench.finished(tmp_path / "absent.jsonl")


def test_summary_gaps_spread_and_a_passing_verdict(bench, tmp_path):
    curriculum = [{"easy": e, "hard": h, "steps": 10, "tokens": 100.0, "synthesis_share": None}
                  for e, h in [(0.90, 0.30), (0.95, 0.40), (1.00, 0.35)]]
    baseline = [{"easy": e, "hard": h, "steps": 10, "tokens": 100.0, "synthesis_share": None}
                for e, h in [(0.95, 0.20), (0.96, 0.25), (0.97, 0.15)]]
    s = bench.summarize({"curriculum": curriculum, "baseline": baseline})
    hard = s["arms"]["curriculum"]["hard"]
    assert hard["mean"] == pytest.approx(0.35) and (hard["min"], hard["max"]) == (0.30, 0.40)
    assert hard["std"] == pytest.approx(0.05)  # sample std of 0.30, 0.40, 0.35
    assert s["gaps"]["hard"] == pytest.approx(0.35 - 0.20)
    assert s["gaps"]["easy"] == pytest.approx(0.95 - 0.96)  # 1 point below: within 2
    assert s["checks"] == {"hard": True, "easy": True, "steps": True} and s["passed"]
    text = bench.table(s)
    assert "hard gap (curriculum - baseline): +15.0 points" in text and text.rstrip().endswith("acceptance: PASS")


@pytest.mark.parametrize("change, failed", [
    ({"hard": 0.29}, "hard"),   # +9 points on hard
    ({"easy": 0.92}, "easy"),   # 3 points below on easy
    ({"steps": 11}, "steps"),   # unequal steps
])
def test_each_acceptance_condition_can_fail(bench, change, failed):
    base = {"easy": 0.95, "hard": 0.20, "steps": 10, "tokens": 100.0, "synthesis_share": None}
    s = bench.summarize({"curriculum": [{**base, "hard": 0.30, **change}], "baseline": [base]})
    assert [k for k, ok in s["checks"].items() if not ok] == [failed] and not s["passed"]
    assert "acceptance: NOT MET" in bench.table(s)


def test_collect_reads_each_arm_and_seed_and_overrides_keep_eval_sets_fixed(bench, tmp_path):
    for arm, hard in (("curriculum", 0.4), ("baseline", 0.1)):
        for seed in (3, 4):
            write_metrics(tmp_path / arm / f"seed{seed}" / "metrics.jsonl", easy=0.9, hard=hard + seed / 100, share=0.5)
    runs = bench.collect(tmp_path, [3, 4])
    assert [r["hard"] for r in runs["curriculum"]] == [pytest.approx(0.43), pytest.approx(0.44)]
    assert bench.summarize(runs)["arms"]["baseline"]["synthesis_share"] == 0.5
    held_out = bench.arm_overrides("baseline", 7, 1, False, ["trainer.lr=1"])
    assert held_out[:3] == ["experiment=curriculum_baseline", "seed=7", "model.tiny.seed=7"] and held_out[-1] == "trainer.lr=1"
    assert not any("curriculum.eval" in o for o in held_out)
    tune = bench.arm_overrides("curriculum", 7, 1, True, [])
    assert "curriculum.eval.easy.synthetic.seed=31" in tune and "curriculum.eval.hard.synthetic.seed=32" in tune
