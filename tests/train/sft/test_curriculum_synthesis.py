"""Curriculum datasets picked by the synthesis pipeline's measured difficulty (train/sft/curriculum.py `files`
sources with labels / pass_rate over `python -m train.synthesis` output; data_pipelines/synthesis/filtering.py
select_by_difficulty): what is selected, the synthesis share a run logs, and errors that name the key."""

import json

import pytest
from omegaconf import OmegaConf

from data_pipelines.synthesis.filtering import select_by_difficulty
from data_pipelines.synthesis.store import read_rows
from train.sft import curriculum
from train.sft.curriculum import CurriculumError
from train.synthesis import recipe

ROWS = [{"id": f"r{i}", "difficulty": {"pass_rate": p, "label": label}}
        for i, (p, label) in enumerate([(0.9, "easy"), (0.7, "easy"), (0.5, "medium"), (0.3, "medium"), (0.0, "hard")])]


@pytest.mark.parametrize("labels, band, ids", [
    (None, None, ["r0", "r1", "r2", "r3", "r4"]),
    (["easy"], None, ["r0", "r1"]),
    (["medium", "hard"], None, ["r2", "r3", "r4"]),
    (None, [0.3, 0.7], ["r1", "r2", "r3"]),  # both bounds inclusive
    (["medium"], [0.4, 1.0], ["r2"]),        # label and band together
    (["nope"], None, []),
])
def test_select_by_difficulty_keeps_labels_in_the_band(labels, band, ids):
    assert [r["id"] for r in select_by_difficulty(ROWS, labels, band)] == ids


def test_select_by_difficulty_rejects_unlabelled_rows_and_bad_bands():
    with pytest.raises(ValueError, match=r"my.jsonl: row 'x' has no difficulty.label / difficulty.pass_rate"):
        select_by_difficulty([*ROWS, {"id": "x", "difficulty": {"digits": 3}}], ["easy"], source="my.jsonl")
    with pytest.raises(ValueError, match=r"low <= high"):
        select_by_difficulty(ROWS, None, [0.8, 0.2])


@pytest.fixture(scope="module")
def synthesis_out(tmp_path_factory):
    """A small run of the embedded synthesis pipeline (reference solver), as ``python -m train.synthesis`` runs it."""
    out = tmp_path_factory.mktemp("synth")
    recipe.run(recipe.load_config(recipe.DEFAULT_CONFIG, ["num_problems=40", "difficulty.samples=16", f"out_dir={out}"]))
    rows = curriculum.source_rows("all", OmegaConf.create({"files": [str(out / "filtered.jsonl")], "labels": None,
                                                           "pass_rate": [0.0, 1.0]}), "train")
    return out, rows


def test_files_source_selects_synthesis_rows_by_label_and_band(synthesis_out):
    out, rows = synthesis_out
    filtered = [r for r in read_rows(out / "filtered.jsonl") if len(r["messages"]) > 1]
    assert [r["id"] for r in rows] == [r["id"] for r in filtered] and len(rows) > 0  # prompt-only rows left out
    labels = {r["difficulty"]["label"] for r in filtered}
    assert len(labels) >= 2  # the test below selects a strict subset
    label = sorted(labels)[0]
    files = [str(out / "filtered.jsonl")]
    picked = curriculum.source_rows("picked", OmegaConf.create({"files": files, "labels": [label]}), "train")
    assert [r["id"] for r in picked] == [r["id"] for r in filtered if r["difficulty"]["label"] == label]
    band = curriculum.source_rows("band", OmegaConf.create({"files": files, "pass_rate": [0.5, 1.0]}), "train")
    assert [r["id"] for r in band] == [r["id"] for r in filtered if r["difficulty"]["pass_rate"] >= 0.5]
    with pytest.raises(CurriculumError, match=r"curriculum\.datasets\.none: no row of .* with a worked solution"):
        curriculum.source_rows("none", OmegaConf.create({"files": files, "labels": ["no-such-label"]}), "train")


def test_plan_logs_the_share_of_documents_from_synthesis(synthesis_out, compose, tiny_tokenizer):
    out, rows = synthesis_out
    cfg = compose(["experiment=curriculum_quickstart", "trainer.row_tokens=256", "data.max_seq_len=256"])
    cfg.curriculum = OmegaConf.create({
        "datasets": {"easy": {"synthetic": {"digits": 1, "num_ops": 1, "num_samples": 30, "seed": 1}},
                     "synth": {"files": [str(out / "filtered.jsonl")], "labels": ["easy", "medium", "hard"]}},
        "phases": [{"name": "a", "mix": {"easy": 1.0}, "steps": 2, "samples": 20},
                   {"name": "b", "mix": {"easy": 1.0, "synth": 3.0}, "steps": 6, "samples": 20}],
    })
    curriculum.check(cfg)
    phases, stats = curriculum.plan(cfg, tiny_tokenizer)
    assert stats["data/phase1/synth/documents"] == 15 and stats["data/phase1/easy/documents"] == 5
    assert stats["data/synthesis_share"] == pytest.approx(2 / 8 * 0 + 6 / 8 * 15 / 20)
    assert stats["data/synth/rows"] == len(rows)


@pytest.mark.parametrize("source, message", [
    ({"files": ["F"], "labels": "easy"}, r"curriculum\.datasets\.s\.labels='easy' must be a non-empty list"),
    ({"files": ["F"], "pass_rate": [0.9, 0.1]}, r"curriculum\.datasets\.s\.pass_rate: .*low <= high"),
    ({"files": ["F"], "pass_rate": [0.2]}, r"curriculum\.datasets\.s\.pass_rate: "),
    ({"files": ["F"], "band": [0.2, 0.5]}, r"curriculum\.datasets\.s: unknown key\(s\) \['band'\]"),
    ({"synthetic": {"digits": 1, "num_samples": 3, "seed": 1}, "labels": ["easy"]},
     r"curriculum\.datasets\.s: a synthetic source takes no other keys"),
    ({"files": ["F"], "synthesis": {"out_dir": "x"}}, r"curriculum\.datasets\.s: unknown key\(s\) \['synthesis'\]"),
    ({"synthesis": {"out_dir": "x"}}, r"curriculum\.datasets\.s must be \{synthetic: \{\.\.\.\}\} or \{files"),
])
def test_bad_selection_fails_naming_the_key(compose, tmp_path, source, message):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "1+1?"}]}) + "\n")
    source = json.loads(json.dumps(source).replace('"F"', json.dumps(str(data))))
    cfg = compose(["experiment=curriculum_quickstart"])
    cfg.curriculum.datasets = OmegaConf.create({"s": source})
    cfg.curriculum.phases = OmegaConf.create([{"mix": {"s": 1.0}, "steps": 1}])
    with pytest.raises(CurriculumError, match=message):
        curriculum.check(cfg)


def test_files_without_labels_selected_by_label_name_the_file(tmp_path):
    data = tmp_path / "plain.jsonl"
    data.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "1+1?"},
                                                        {"role": "assistant", "content": "2"}]}) + "\n")
    with pytest.raises(ValueError, match=r"curriculum plain: row 'a' has no difficulty.label"):
        curriculum.source_rows("plain", OmegaConf.create({"files": [str(data)], "labels": ["easy"]}), "train")
