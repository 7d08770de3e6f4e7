import json

import pytest

from train.run.report import draw, main


def test_report_draws_pngs_from_metrics_jsonl(tmp_path, capsys):
    rows = [{"step": s, "train/loss": 2.0 / s, "train/lr": 1e-3, "perf/tokens_per_s": 5000 + s} for s in range(1, 30)]
    rows += [{"step": 10, "eval/accuracy": 0.2}, {"step": 29, "eval/accuracy": 0.9, "eval/response_length_mean": 50.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    main([str(tmp_path)])
    written = capsys.readouterr().out.split()
    names = {p.rsplit("/", 1)[1] for p in written}
    assert {"loss.png", "accuracy.png", "throughput.png", "overview.png"} <= names
    assert "kl.png" not in names  # no KL in this run
    for path in written:
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        draw(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        draw(tmp_path)


def test_report_draws_the_rl_panels_from_the_names_the_rl_driver_logs(tmp_path):
    # Names as train/rl/step_metrics.py logs them (and RunLogger.log_histogram's _p50/_p90 statistics).
    rows = [{"step": s, "reward/total": 0.1 * s, "reward/correctness": 0.05 * s, "reward/format": 1.0,
             "rollout/response_length_mean": 40.0 - s, "rollout/response_length_p90": 50.0 - s, "train/kl": 0.01 * s,
             "perf/tokens_per_s": 900.0 + s, "train/loss": 0.5, "train/lr": 2e-5, "train/grad_norm": 1.0 + s}
            for s in range(1, 6)]  # no eval/accuracy: the accuracy panel comes from the correctness reward
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    names = {p.name for p in draw(tmp_path)}
    assert {"reward.png", "accuracy.png", "response_length.png", "kl.png", "throughput.png"} <= names
