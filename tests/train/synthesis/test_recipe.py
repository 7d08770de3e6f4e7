"""The PromptCoT synthesis recipe (train/synthesis/): stages, measured difficulty labels vs the generator's ground truth,
resume, backends, CLI."""

import json

import pytest

from data_pipelines.prompts import to_prompts
from data_pipelines.synthesis.estimate import check_labels, label_for
from data_pipelines.synthesis.solvers import ReferenceSolver
from data_pipelines.synthesis.store import read_rows
from data_pipelines.validation import validate_rows
from tests.conftest import REPO, TEST_ARCH
from train.synthesis.recipe import DEFAULT_CONFIG, load_config, main, run

STEP_ERROR = 0.012  # configs/synthesis/arithmetic.yaml


def _cfg(out, *overrides, config=DEFAULT_CONFIG):
    return load_config(config, [f"out_dir={out}", *overrides])


def _rows(out, stage_file):
    return read_rows(out / stage_file)


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory):
    """The embedded default end to end: 200 problems, 128 reference-solver samples each."""
    out = tmp_path_factory.mktemp("synth")
    summary = run(_cfg(out, "num_problems=200", "difficulty.samples=128", "filter.band=[0.3,0.7]", "parquet=true"))
    return out, summary


def test_stages_write_provenance_and_training_rows(synthesized, tiny_tokenizer):
    out, summary = synthesized
    assert [summary[s]["rows"] for s in ("concepts", "rationales", "problems", "difficulty")] == [200] * 4
    assert all(summary[s]["errors"] == 0 for s in summary)
    problem = _rows(out, "problems.jsonl")[0]
    assert problem["stage"] == "problems" and problem["id"] == "synth-0-0.r0.p0" and problem["source_id"] == "synth-0-0.r0"
    assert problem["seed"] == 0 and problem["generator"] == "arithmetic_template" and problem["concept_ids"]
    assert [step["stage"] for step in problem["lineage"]] == ["concepts", "rationales"]
    difficulty = _rows(out, "difficulty.jsonl")
    assert all(r["num_samples"] == 128 and r["solver"].startswith("reference_solver(simulation") for r in difficulty)
    kept = _rows(out, "filtered.jsonl")
    expected = [r["id"] for r in difficulty if 0.3 <= r["pass_rate"] <= 0.7]
    assert [r["id"] for r in kept] == expected and 0 < len(kept) < 200
    validate_rows(kept, "filtered.jsonl")  # SFT-ready: every kept arithmetic row has a worked solution
    prompts = to_prompts(tiny_tokenizer, kept)
    assert prompts[0].answer == kept[0]["answer"] and prompts[0].meta["difficulty"]["label"] in ("easy", "medium", "hard")
    import pyarrow.parquet as pq

    assert pq.read_table(out / "filtered.parquet").num_rows == len(kept)


def test_measured_labels_agree_with_generator_ground_truth(synthesized):
    """Ground truth: the generator's column count, whose level is the label of the simulated solver's true pass
    rate (1 - e*C)^C; measured: the label of the pass rate of 128 scored samples."""
    out, _ = synthesized
    rows = _rows(out, "difficulty.jsonl")
    labels = check_labels({"easy": 0.7, "medium": 0.3, "hard": 0.0})
    steps = [r["ground_truth"]["column_steps"] for r in rows]
    truth = [label_for((1 - STEP_ERROR * c) ** c, labels) for c in steps]
    agreement = sum(r["label"] == t for r, t in zip(rows, truth)) / len(rows)
    counts = {level: truth.count(level) for level in ("easy", "medium", "hard")}
    print(f"label agreement with ground truth: {agreement:.3f} on {len(rows)} problems; true levels {counts}")
    assert agreement >= 0.9
    assert min(counts.values()) >= 20  # every level is well represented
    mean_steps = {level: sum(c for c, r in zip(steps, rows) if r["label"] == level) / sum(r["label"] == level for r in rows)
                  for level in counts}
    assert mean_steps["easy"] < mean_steps["medium"] < mean_steps["hard"]


def test_labels_come_from_measurement_not_ground_truth(synthesized, tmp_path):
    out, _ = synthesized
    problems = _rows(out, "problems.jsonl")[:40]
    for row in problems:  # scramble the generator's ground truth: the labels must not move
        row["ground_truth"] = {"column_steps": 1, "carries": 0, "borrows": 0, "digits": 1, "num_ops": 1}
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in problems))
    run(_cfg(tmp_path, "stages=[difficulty]", "difficulty.samples=128"))
    measured = {r["id"]: r["label"] for r in _rows(out, "difficulty.jsonl")}
    assert {r["id"]: r["label"] for r in _rows(tmp_path, "difficulty.jsonl")} == {r["id"]: measured[r["id"]] for r in problems}
    perfect = tmp_path / "perfect"
    perfect.mkdir()
    (perfect / "problems.jsonl").write_text((tmp_path / "problems.jsonl").read_text())
    run(_cfg(perfect, "stages=[difficulty]", "difficulty.samples=8", "difficulty.solver.step_error=0.0"))
    assert {r["pass_rate"] for r in _rows(perfect, "difficulty.jsonl")} == {1.0}


class _CrashAfter:
    """Wraps a solver and raises on its ``n``-th call: an interrupted run."""

    def __init__(self, solver, n):
        self.solver, self.n, self.calls, self.name = solver, n, 0, solver.name

    def solve(self, *args):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt("simulated crash")
        return self.solver.solve(*args)


def test_crash_mid_stage_resumes_without_duplicates(tmp_path):
    args = ("num_problems=40", "difficulty.samples=16", "difficulty.batch_size=8")
    reference = tmp_path / "uninterrupted"
    run(_cfg(reference, *args))
    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(crashed, *args), solver=_CrashAfter(ReferenceSolver(STEP_ERROR), 3))
    partial = _rows(crashed, "difficulty.jsonl")
    assert len(partial) == 16  # two batches of 8 were written before the crash
    with open(crashed / "difficulty.jsonl", "a") as f:
        f.write('{"id": "synth-0-17.r0.p0", "stage": "diff')  # torn line from a kill mid-write
    summary = run(_cfg(crashed, *args))
    assert summary["difficulty"]["resumed_from"] == 16 and summary["difficulty"]["written_now"] == 24
    assert summary["concepts"]["written_now"] == 0 and summary["problems"]["written_now"] == 0
    for stage_file in ("concepts.jsonl", "rationales.jsonl", "problems.jsonl", "difficulty.jsonl", "filtered.jsonl"):
        resumed, clean = _rows(crashed, stage_file), _rows(reference, stage_file)
        assert len({r["id"] for r in resumed}) == len(resumed)  # no duplicates
        assert sorted(resumed, key=lambda r: r["id"]) == sorted(clean, key=lambda r: r["id"])  # same rows as no crash


def test_model_generator_and_solver_run_on_the_hf_backend(tmp_path, model_cache):
    """Smoke test of the real-model code path with a tiny untrained model: prompts, sampling, parsing, scoring."""
    from train.models.model_zoo import embedded_model_path

    model = embedded_model_path(model_cache, TEST_ARCH, 384, 0)
    cfg = _cfg(tmp_path, "num_problems=2", f"generator.model_path={model}", "generator.max_new_tokens=12",
               "generator.batch_size=2", f"difficulty.solver.model_path={model}", "difficulty.solver.max_new_tokens=12",
               "difficulty.samples=3", "stages=[concepts,rationales,problems]",
               config=REPO / "configs/synthesis/model.yaml")
    summary = run(cfg)
    problems = _rows(tmp_path, "problems.jsonl")
    assert summary["rationales"]["rows"] == 2 and len(problems) == 2
    assert all(r["generator"] == f"hf:{model}" for r in problems)
    for row in problems:  # an untrained model cannot follow the format: the row records why and the run goes on
        assert "question" in row or "prompts.problem" in row["error"]
    # the solver path: hand it two well-formed problems
    rows = [{**problems[0], "id": f"q{i}", "question": q, "answer": a, "error": None}
            for i, (q, a) in enumerate([("What is 2 + 3?", "5"), ("What is 10 - 4?", "6")])]
    for row in rows:
        row.pop("error")
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(_cfg(tmp_path, "stages=[difficulty]", f"difficulty.solver.model_path={model}", "difficulty.solver.backend=hf",
             "difficulty.samples=3", "difficulty.solver.max_new_tokens=12", config=REPO / "configs/synthesis/model.yaml"))
    measured = _rows(tmp_path, "difficulty.jsonl")
    assert [r["num_samples"] for r in measured] == [3, 3]
    assert all(r["solver"] == f"hf:{model}" and r["pass_rate"] in (0.0, 1 / 3, 2 / 3, 1.0) for r in measured)


@pytest.mark.parametrize("overrides, error, match", [
    (["concepts.include=[add_carry,not_a_concept]"], ValueError, r"concepts\.include: unknown concept id\(s\) \['not_a_concept'\]"),
    (["filter.band=[0.8,0.2]"], ValueError, r"filter\.band=\[0\.8, 0\.2\].*low <= high"),
    (["concepts.items=null", "concepts.file=/nonexistent/concepts.jsonl"], FileNotFoundError, r"concepts\.file"),
    (["difficulty.labels={easy: 0.7, hard: 0.3}"], ValueError, r"difficulty\.labels.*threshold 0\.0"),
    (["generator.backend=hf"], ValueError, r"generator\.model_path is required"),
    (["difficulty.solver.backend=hf", "difficulty.solver.model_path=/nonexistent"], FileNotFoundError,
     r"difficulty\.solver\.model_path"),
    (["stages=[concepts,summarize]"], ValueError, r"stages: unknown stage"),
    (["filter.labels=[tricky]"], ValueError, r"filter\.labels: unknown label"),
])
def test_bad_input_fails_early_naming_the_field(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        run(_cfg(tmp_path / "out", *overrides))
    assert not (tmp_path / "out").exists()  # nothing was started


def test_missing_stage_input_and_vllm_on_cpu_say_what_to_do(tmp_path, model_cache):
    with pytest.raises(FileNotFoundError, match=r"stage 'difficulty' reads .*problems\.jsonl.*run stage 'problems' first"):
        run(_cfg(tmp_path, "stages=[difficulty]"))
    from train.models.model_zoo import embedded_model_path

    model = embedded_model_path(model_cache, TEST_ARCH, 384, 0)
    with pytest.raises((RuntimeError, ImportError), match=r"generator\.backend=vllm"):
        run(_cfg(tmp_path, "generator.backend=vllm", f"generator.model_path={model}", "num_problems=1"))


def test_cli_help_explains_stages_and_backends(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: python -m train.synthesis")
    for word in ("concepts", "rationales", "problems", "difficulty", "filter", "reference_solver", "SIMULATION",
                 "vllm", "ray", "Resume", "--parquet"):
        assert word in printed


def test_cli_takes_overrides_between_flags(capsys):
    assert main(["--out", "/tmp/never", "--parquet", "filter.band=[0.2,0.8]", "--stages", "difficulty,filter",
                 "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "parquet: true" in printed and "- 0.2\n  - 0.8" in printed and "- difficulty\n- filter" in printed


def test_the_readme_command_runs():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "train.synthesis", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m train.synthesis")
