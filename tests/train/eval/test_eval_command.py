"""`python -m train.eval` end to end on the test-size model and a GSM8K-shaped file: greedy answers equal Hugging
Face `generate`, pass@k / maj@k / lengths / truncation recomputed from the per-sample records, the breakdown by a
row column, the JSON results and the one-line errors."""

import json
import os
import subprocess
import sys
from math import comb
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from tests.conftest import CONFIG_DIR, TEST_ARCH

REPO = Path(__file__).resolve().parents[3]
FIXTURE = REPO / "tests" / "fixtures" / "gsm8k_style" / "test.jsonl"


def _eval_cfg(overrides, run_dir):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="eval", overrides=list(overrides))
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


@pytest.fixture
def model_dir(model_cache):
    """The test-size model, built once per session in the shared cache (conftest.py)."""
    from train.models.model_zoo import embedded_model_path

    return str(embedded_model_path(model_cache, dict(TEST_ARCH), 384, 0))


def test_eval_end_to_end_on_gsm8k_file(tmp_path, model_dir, one_thread):
    from data_pipelines.chat_format import generation_prompt
    from train.eval.recipe import run
    from train.models.evaluate import generate_greedy
    from train.models.model_zoo import load_model, load_tokenizer

    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()[:6]]
    for i, row in enumerate(rows):
        row["source"] = "even" if i % 2 == 0 else "odd"  # a breakdown column, carried through from the file
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _eval_cfg([f"model.path={model_dir}", "data=gsm8k", f"data.eval_files=[{data}]", "eval.samples=4",
                     "eval.pass_k=[1,2,4]", "eval.maj_k=[4]", "eval.max_new_tokens=12", "logger.mode=disabled",
                     "cluster.device=cpu"], tmp_path / "run")
    results = run(cfg)

    saved = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert saved["metrics"] == results["metrics"] and saved["metrics"]["problems"] == 6
    problems = [json.loads(line) for line in (tmp_path / "run" / "eval_samples.jsonl").read_text().splitlines()]
    assert [p["answer"] for p in problems] == [r["answer"].rsplit("#### ", 1)[1] for r in rows]

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    prompts = [generation_prompt(tok, [{"role": "user", "content": r["question"]}]) for r in rows]
    expected = tok.batch_decode(generate_greedy(model, tok, prompts, 12), skip_special_tokens=True)
    assert [p["greedy"]["response"] for p in problems] == expected  # the rollout loop's greedy = HF generate

    m = results["metrics"]
    counts = [sum(s["correct"] for s in p["samples"]) for p in problems]
    for k in (1, 2, 4):
        golden = sum(1 - comb(4 - c, k) / comb(4, k) for c in counts) / 6
        assert m[f"pass@{k}"] == pytest.approx(golden, abs=1e-12)
    sampled = [s for p in problems for s in p["samples"]]
    assert len(sampled) == 24 and all(1 <= s["length"] <= 12 for s in sampled)
    assert m["sampled/truncation_rate"] == pytest.approx(sum(s["truncated"] for s in sampled) / 24)
    assert all(s["length"] == 12 for s in sampled if s["truncated"])  # truncated = hit the budget without eos
    assert m["sampled/response_length_mean"] == pytest.approx(sum(s["length"] for s in sampled) / 24)
    assert m["greedy/accuracy"] == pytest.approx(sum(p["greedy"]["correct"] for p in problems) / 6)
    assert 0.0 <= m["maj@4"] <= m["pass@4"]
    assert sorted(results["breakdown"]["source"]) == ["even", "odd"]
    assert results["breakdown"]["source"]["even"]["problems"] == 3
    metrics_line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics_line["eval/pass@4"] == pytest.approx(m["pass@4"])


def test_missing_data_file_names_the_key(tmp_path, model_dir):
    from train.eval.recipe import run

    cfg = _eval_cfg([f"model.path={model_dir}", "data=gsm8k", "data.eval_files=[/no/such/test.jsonl]",
                     "logger.mode=disabled"], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="data.eval_files: data file '/no/such/test.jsonl' does not exist"):
        run(cfg)


def test_missing_model_path_prints_one_line(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "train.eval", f"run_dir={tmp_path}/run", "logger.mode=disabled"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "model.path is required" in errors[0], out.stderr[-2000:]


def _problem(correct, votes, meta):
    samples = [{"response": "", "correct": c, "length": 10 + i, "truncated": False, "vote": v}
               for i, (c, v) in enumerate(zip(correct, votes))]
    return {"id": "p", "prompt": "q", "answer": "1", "meta": meta, "samples": samples,
            "greedy": {"response": "", "correct": correct[0], "length": 10, "truncated": False, "vote": votes[0]}}


def test_breakdown_groups_by_scalar_and_dict_columns_and_goes_to_a_wandb_table(tmp_path):
    from train.eval.recipe import breakdowns, write

    cfg = _eval_cfg(["model.path=unused", "eval.samples=2", "eval.pass_k=[1,2]", "eval.maj_k=[2]", "logger.mode=offline"],
                    tmp_path / "run")
    problems = [_problem([True, False], ["1", "2"], {"difficulty": {"digits": 2, "num_ops": 1}}),
                _problem([False, False], ["3", None], {"difficulty": {"digits": 3, "num_ops": 1}}),
                _problem([True, True], ["1", "1"], {"difficulty": {"digits": 2, "num_ops": 1}})]
    groups = breakdowns(problems, cfg.eval)["difficulty"]
    assert sorted(groups) == ["digits=2,num_ops=1", "digits=3,num_ops=1"]
    two = groups["digits=2,num_ops=1"]
    assert two["problems"] == 2 and two["pass@1"] == pytest.approx(0.75) and two["pass@2"] == 1.0
    assert two["maj@2"] == 1.0  # problem 0: a 1-1 tie goes to the first answer ("1", right)
    assert groups["digits=3,num_ops=1"]["pass@2"] == 0.0
    from train.eval.recipe import problem_metrics

    results = {"metrics": problem_metrics(problems, cfg.eval), "breakdown": {"difficulty": groups}}
    write(cfg, results, problems)
    tables = list((tmp_path / "run" / "wandb").glob("offline-run-*/files/media/table/eval/results_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert [row[table["columns"].index("group")] for row in table["data"]] == \
        ["all", "difficulty=digits=2,num_ops=1", "difficulty=digits=3,num_ops=1"]
