"""Multi-phase SFT (train/sft/curriculum.py + train/sft/recipe.py): phase switches, per-phase lr and data, freezing, resume
in the middle of a phase, and config errors that name the key."""

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from safetensors.torch import load_file

from data_pipelines.batching import PackedBatchStream
from train.__main__ import run
from train.sft.curriculum import CurriculumError

pytestmark = pytest.mark.usefixtures("one_thread")


BASE = [
    "experiment=curriculum_quickstart",
    "trainer.row_tokens=256",
    "data.max_seq_len=256",
    "trainer.rows_per_micro_batch=1",
    "trainer.grad_accum=2",
    "trainer.eval_every=0",
    "trainer.save_every=3",
    "trainer.keep_last=3",
    "trainer.resume=null",
    "rollout.max_new_tokens=4",
]

CURRICULUM = {
    "datasets": {
        "a": {"synthetic": {"digits": [1, 2], "num_ops": 1, "num_samples": 40, "seed": 1}},
        "b": {"synthetic": {"digits": 3, "num_ops": 1, "num_samples": 40, "seed": 2}},
        "c": {"synthetic": {"digits": 1, "num_ops": 2, "num_samples": 40, "seed": 3}},
    },
    "eval": {"hard": {"synthetic": {"digits": 3, "num_ops": 1, "num_samples": 2, "seed": 4}}},
    "phases": [
        {"name": "warm", "mix": {"a": 3.0, "c": 1.0, "b": 0.0}, "steps": 3, "lr": 1e-2, "warmup_steps": 1,
         "min_lr_ratio": 0.1, "decay": "cosine"},
        {"name": "hot", "mix": {"b": 1.0}, "steps": 3, "lr": 5e-3, "warmup_steps": 0, "min_lr_ratio": 0.5,
         "decay": "linear", "freeze": [r"layers\.0\."]},
    ],
}


def _config(compose, run_dir, curriculum=None, overrides=()):
    cfg = compose(BASE + [f"run_dir={run_dir}", *overrides])
    with open_dict(cfg):
        cfg.curriculum = OmegaConf.create(curriculum or CURRICULUM)
    return cfg


def _metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_phases_switch_data_lr_and_frozen_parameters_at_the_configured_step(compose, tmp_path, monkeypatch):
    seen_batches = []
    next_batch = PackedBatchStream.next  # the stream stays in the driver: it hands each step's rows to the ranks

    def recording_next(self):
        batch = next_batch(self)
        seen_batches.append(batch.sample_ids)
        return batch

    monkeypatch.setattr(PackedBatchStream, "next", recording_next)
    summary = run(_config(compose, tmp_path / "run"))

    # 3 + 3 steps; the logged phase switches after step 3
    assert [p["steps"] for p in summary["phases"]] == [3, 3]
    steps = [m for m in _metrics(tmp_path / "run") if "train/loss" in m]
    assert [m["train/phase"] for m in steps] == [0, 0, 0, 1, 1, 1]
    # lr the ranks' optimizer stepped with (its param groups' lr, logged), per phase (warmup from 0, then cosine /
    # linear), computed by hand
    expected = [0.0, 1e-2, 1e-2 * (0.5 * 0.9 + 0.1), 5e-3, 5e-3 * (1 - 0.5 / 3), 5e-3 * (1 - 0.5 * 2 / 3)]
    assert [m["train/lr"] for m in steps] == pytest.approx(expected, rel=1e-12, abs=1e-15)

    # documents per dataset: all 80 documents of the mixed datasets split 3:1; b has weight 0 in phase 0
    assert summary["phases"][0]["mix"] == {"a": 60, "c": 20} and summary["phases"][1]["mix"] == {"b": 40}
    # every row of step s comes from the mix of the phase of step s (provenance: phase/dataset/row id)
    assert len(seen_batches) == 6 * 2
    for index, sample_ids in enumerate(seen_batches):
        phase, allowed = ("warm", {"a", "c"}) if index // 2 < 3 else ("hot", {"b"})
        for sample_id in sample_ids:
            name, dataset, row_id = sample_id.split("/")
            assert name == phase and dataset in allowed and row_id.startswith(dataset + "-")
    assert {s.split("/")[1] for ids in seen_batches[:6] for s in ids} == {"a", "c"}
    # difficulty range [1, 2]: rows of both digit counts
    assert {s.split("/")[2].split("-")[1] for ids in seen_batches[:6] for s in ids if "/a/" in s} == {"d1o1", "d2o1"}

    # phase-end and final evaluation under eval/phase{k}/...
    logged = {k for m in _metrics(tmp_path / "run") for k in m}
    assert {"eval/phase0/hard/accuracy", "eval/phase1/hard/accuracy", "eval/hard/accuracy"} <= logged
    assert "eval/phase1/hard/accuracy" in summary

    # layer 0 is frozen in phase 1 only: it moved in steps 1-3, not in steps 4-6; layer 1 moved in both
    ckpts = tmp_path / "run" / "checkpoints"
    at_3, at_6 = load_file(ckpts / "step_3" / "model.safetensors"), load_file(ckpts / "step_6" / "model.safetensors")
    layer0 = [k for k in at_3 if "layers.0." in k]
    layer1 = [k for k in at_3 if "layers.1." in k]
    assert layer0 and all(torch.equal(at_3[k], at_6[k]) for k in layer0)
    assert all(not torch.equal(at_3[k], at_6[k]) for k in layer1 if "norm" not in k)


def test_resume_in_the_middle_of_each_phase_reproduces_the_uninterrupted_run(compose, tmp_path):
    curriculum = OmegaConf.to_container(OmegaConf.create(CURRICULUM))
    curriculum["phases"][0]["steps"] = 4  # checkpoints at 3 (inside phase 0) and 6 (inside phase 1), then 8
    curriculum["phases"][1]["steps"] = 4
    curriculum["eval"] = {}
    full = run(_config(compose, tmp_path / "run", curriculum))
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_3", "step_6", "step_8"]
    for resume_at in (6, 3):
        for later in ckpts.glob("step_*"):
            if int(later.name.split("_")[1]) > resume_at:
                shutil.rmtree(later)
        (ckpts / "latest").write_text(f"step_{resume_at}")
        resumed = run(_config(compose, tmp_path / "run", curriculum, ["trainer.resume=auto"]))
        assert resumed["losses"] == full["losses"][resume_at:]  # exact: same phase, data position, RNG and Adam state


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(phases=[]), r"curriculum\.phases is empty"),
        (lambda c: c["phases"][1]["mix"].update(b=-1.0), r"curriculum\.phases\[1\]\.mix\.b=-1\.0 must be a number >= 0"),
        (lambda c: c["phases"][0]["mix"].update(nope=1.0), r"curriculum\.phases\[0\]\.mix: unknown dataset 'nope'"),
        (lambda c: c["phases"][0].update(epochs=1), r"curriculum\.phases\[0\]: set exactly one of steps or epochs"),
        (lambda c: c["datasets"]["a"]["synthetic"].update(digits=0), r"curriculum\.datasets\.a\.synthetic: .*digits"),
        (lambda c: c["phases"][1].update(decay="step"), r"curriculum\.phases\[1\]\.decay='step'"),
    ],
)
def test_bad_curriculum_fails_before_any_work_naming_the_key(compose, tmp_path, edit, message):
    curriculum = OmegaConf.to_container(OmegaConf.create(CURRICULUM))
    edit(curriculum)
    cfg = _config(compose, tmp_path / "run", curriculum)
    with pytest.raises(CurriculumError, match=message):
        run(cfg)
    assert not any((tmp_path / "run").glob("*"))  # nothing written: no data, model, logger or checkpoint
