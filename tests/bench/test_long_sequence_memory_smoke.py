"""bench/long_sequence_memory.py: one configuration measured in its own process (the path every row takes), and the
table's ratios against the plain row of the same phase and length."""

import math
from argparse import Namespace

import pytest

from tests.bench.bench_modules import load_bench

bench = load_bench("long_sequence_memory")


@pytest.mark.slow  # a fresh interpreter with DeepSpeed: ~30 s, over a minute on a loaded machine
def test_one_configuration_runs_in_a_fresh_process(tmp_path):
    args = Namespace(vocab=512, chunk_tokens=48, threads=1, entropy_coef=0.01, timeout=600.0)
    args.model_path = bench.build_model(tmp_path, args.vocab, bench.PROMPT_TOKENS + 100)
    row = bench.run_in_subprocess(bench.Configuration("rl", 100, tiled=True, checkpointing=True), args)
    assert "error" not in row, row
    assert row["phase"] == "rl" and row["tiled"] and row["checkpointing"] and row["sp"] == 1
    assert row["peak_mb"] >= row["start_mb"] > 50 and row["tokens_per_s"] > 0
    assert math.isfinite(row["loss"]) and abs(row["loss"]) < 10  # a GRPO loss of ratio-1 tokens: about -A * 1


def test_table_ratios_are_against_the_plain_row():
    rows = [{"phase": "sft", "response_tokens": 1024, "sp": 1, "tiled": t, "checkpointing": c, "start_mb": 400.0,
             "peak_mb": peak, "tokens_per_s": 100.0} for t, c, peak in
            [(False, False, 1000.0), (True, True, 500.0)]]
    rows.append({"phase": "sft", "response_tokens": 1024, "sp": 1, "tiled": False, "checkpointing": True,
                 "error": "over 5 s"})
    text = bench.table(rows)
    lines = text.splitlines()
    assert lines[2].endswith("| 400 | 1,000 | 600 | 1.00 | 100 |")
    assert lines[3].endswith("| 400 | 500 | 100 | 0.50 | 100 |")
    assert "not measured: over 5 s" in lines[4]
