"""W&B logging: an offline run holds the resolved config, the metrics (x-axis global_step) and the sample table,
never the API key; histograms; a resumed run continues the same W&B run. The offline ``run-*.wandb`` file is
read back record by record, so these tests check what `wandb sync` would upload."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO
from train.models.model_zoo import resolve_model_path
from train.run.report import draw
from train.run.run_logger import RunLogger

FAKE_KEY = "fake-secret-0123456789abcdef0123456789abcdef01234567"  # 40+ chars, the shape of a real key


def wandb_records(run_dir: Path, index: int = 0) -> list:
    """The protobuf records of the ``index``-th offline W&B run under ``run_dir`` (a resumed run has several).
    wandb's leveldb-style log: 7-byte file header, 32 KiB blocks, 7-byte record headers crc/length/type
    (type 1 = full record, 2-4 = its first/middle/last chunk)."""
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # run.finish() returns before wandb's service process has written the file out
    path = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))[index]
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        block_left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if block_left < 7 or (length == 0 and kind == 0):  # block trailer padding
            pos += block_left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def history(records) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def offline_logger(run_dir, **cfg):
    return RunLogger(OmegaConf.create({"mode": "offline", "project": "test", **cfg}), run_dir, {"trainer": {"lr": 0.5}})


def test_tiny_sft_run_logs_config_metrics_samples_offline_and_never_the_api_key(tmp_path, compose):
    # The CLI, so Hydra's own dumps (.hydra/*.yaml, the job log) are checked for the key too.
    run_dir = tmp_path / "run"
    model_path = resolve_model_path(compose(["experiment=quickstart"]).model)  # the test-size model, built once
    overrides = ["experiment=quickstart", "trainer.max_steps=3", "trainer.warmup_steps=1", "trainer.eval_every=0",
                 "trainer.save_every=0", "trainer.resume=null", "trainer.row_tokens=512", "trainer.rows_per_micro_batch=1",
                 "data.synthetic.train.num_samples=200", "data.synthetic.eval.num_samples=4", "rollout.max_new_tokens=8",
                 "logger.mode=offline", f"model.path={model_path}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_API_KEY": FAKE_KEY, "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-m", "train", *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.parts[-2:] == (".hydra", "config.yaml") for p in files)
    leaks = [str(p) for p in files if FAKE_KEY.encode() in p.read_bytes() or FAKE_KEY in str(p)]
    assert not leaks

    records = wandb_records(run_dir)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    # The composed config with the command line applied and run_dir filled in at start (null in the YAML).
    assert config["trainer"]["max_steps"] == 3 and config["run_dir"] == str(run_dir) and config["logger"]["mode"] == "offline"
    step_metrics = {m.metric.glob_name: m.metric.step_metric for m in records if m.WhichOneof("record_type") == "metric"}
    assert all(step_metrics.get(f"{p}/*") == "global_step" for p in ("train", "eval", "perf", "rollout", "reward"))
    rows = history(records)
    assert [r["global_step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    local = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["train/loss"] for r in local if "train/loss" in r] == [r["train/loss"] for r in rows if "train/loss" in r]
    (table_row,) = [r for r in rows if "eval/samples/_type" in r]
    assert table_row["eval/samples/_type"] == "table-file" and table_row["global_step"] == 3
    table = json.loads(next(run_dir.glob("wandb/offline-run-*/files/media/table/eval/samples_*.table.json")).read_text())
    assert len(table["data"]) == 4 and "response" in table["columns"]

    # The same run's jsonl makes the report's PNGs.
    names = {p.name for p in draw(run_dir)}
    assert {"loss.png", "accuracy.png", "throughput.png", "overview.png"} <= names


def test_histogram_logs_wandb_histogram_and_summary_stats(tmp_path):
    import torch

    logger = offline_logger(tmp_path)
    logger.log_histogram("rollout/response_length", torch.tensor([10.0, 1.0, float("nan"), 4.0, 2.0, 3.0]), step=7)
    logger.log_histogram("rollout/empty", [], step=7)  # nothing to summarise: nothing logged
    logger.finish()
    # Golden values by hand: sorted finite values 1 2 3 4 10; p90 at rank 0.9 * 4 = 3.6 -> 4 + 0.6 * (10 - 4).
    expected = {"min": 1.0, "mean": 4.0, "max": 10.0, "p50": 3.0, "p90": 7.6}
    (row,) = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert row.pop("step") == 7
    assert row == pytest.approx({f"rollout/response_length_{k}": v for k, v in expected.items()})
    (logged,) = [r for r in history(wandb_records(tmp_path)) if "rollout/response_length/_type" in r]
    assert logged["rollout/response_length/_type"] == "histogram" and sum(logged["rollout/response_length/values"]) == 5
    assert logged["global_step"] == 7 and logged["rollout/response_length_p90"] == pytest.approx(7.6)


def test_resumed_run_continues_the_same_wandb_run_even_at_earlier_steps(tmp_path):
    first = offline_logger(tmp_path)
    for step in (1, 2, 3):
        first.log({"train/loss": 1.0 / step}, step)
    first.finish()
    # A requeued job restarts from its step-2 checkpoint in the same run_dir: same W&B id, step 3 logged again.
    second = offline_logger(tmp_path)
    second.log({"train/loss": 0.3}, 3)
    second.finish()
    run_id = (tmp_path / "wandb_id").read_text()
    assert [p.name for p in tmp_path.glob("wandb/offline-run-*/run-*.wandb")] == [f"run-{run_id}.wandb"] * 2
    resumed = wandb_records(tmp_path, index=1)
    (run_record,) = [r for r in resumed if r.WhichOneof("record_type") == "run"]
    assert run_record.run.run_id == run_id
    assert [r["global_step"] for r in history(resumed) if "train/loss" in r] == [3]  # not dropped as "old"


def test_samples_every_picks_the_steps_with_sample_tables(tmp_path):
    logger = RunLogger(OmegaConf.create({"mode": "disabled", "samples_every": 10}), tmp_path)
    assert [s for s in range(0, 31) if logger.samples_due(s)] == [0, 10, 20, 30]
    never = RunLogger(OmegaConf.create({"mode": "disabled", "samples_every": 0}), tmp_path)
    assert not any(never.samples_due(s) for s in range(0, 31))


def test_a_config_containing_the_api_key_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    with pytest.raises(ValueError, match="WANDB_API_KEY environment variable"):
        RunLogger(OmegaConf.create({"mode": "disabled"}), tmp_path, {"logger": {"api_key": FAKE_KEY}})
