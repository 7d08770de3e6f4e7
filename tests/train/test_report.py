import json

import pytest

from train.report import draw, main


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
