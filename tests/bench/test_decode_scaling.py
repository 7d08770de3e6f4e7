"""bench/decode_scaling.py's non-timing logic: the parameter match, the decode-state accounting of both decoders, the
ratios and verdict, the table and the plot (timings themselves are the bench's to report)."""

import pytest

from tests.bench.bench_modules import load_bench
from train.models.model_zoo import embedded_model_path

QWEN = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": True}
MAMBA = {"model_type": "mamba2", "hidden_size": 32, "num_hidden_layers": 2, "expand": 2, "num_heads": 4, "head_dim": 16,
         "state_size": 16, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def bench():
    return load_bench("decode_scaling")


def test_parameter_count_and_the_matched_mamba(bench):
    # Qwen2, tied embeddings: 386 x 32 embedding; per layer q 32x32+32, k and v 32x16+16 (2 KV heads of 8), o 32x32,
    # MLP 3 x 32x64, two RMSNorms of 32; the final norm 32
    layer = (32 * 32 + 32) + 2 * (32 * 16 + 16) + 32 * 32 + 3 * 32 * 64 + 2 * 32
    assert bench.parameter_count(QWEN, 386) == 386 * 32 + 2 * layer + 32
    # Mamba-2 at hidden 48: inner 96 = 6 heads of 16; in_proj 48 x (2*96 + 2*16 + 6), conv 128 channels x 4 + bias,
    # dt_bias, A_log, D (6 each), gated norm 96, out_proj 96 x 48, block norm 48; embedding 386 x 48, final norm 48
    arch = bench.mamba_at_width(MAMBA, 48)
    assert arch["num_heads"] == 6 and bench.mamba_at_width(MAMBA, 36) is None  # 72 is not a whole number of heads of 16
    layer = 48 * 230 + 128 * 4 + 128 + 3 * 6 + 96 + 96 * 48 + 48
    assert bench.parameter_count(arch, 386) == 386 * 48 + 2 * layer + 48


def test_closest_prefers_the_nearest_then_the_smaller(bench):
    assert bench.closest([(90, "a"), (120, "b"), (104, "c")], 100) == (104, "c")
    assert bench.closest([(110, "big"), (90, "small")], 100) == (90, "small")
    with pytest.raises(ValueError, match="no candidate"):
        bench.closest([], 100)


@pytest.mark.usefixtures("one_thread")
def test_decode_state_accounting_of_both_models(bench, model_cache):
    """The KV cache holds every token (layers x (k, v) x KV heads x head dim x fp32 per token); Mamba-2's state is
    the same after any prompt and any number of steps."""
    per_token = 2 * 2 * 2 * 8 * 4
    rows = {}
    for name, arch in (("transformer", QWEN), ("mamba2", MAMBA)):
        path = str(embedded_model_path(model_cache, arch, 384, 0))
        rows[name] = [bench.measure(path, context, 3) for context in (10, 40)]
    assert [r["state_mib"] * 2**20 for r in rows["transformer"]] == [per_token * 13, per_token * 43]
    conv = 2 * (64 + 2 * 16) * 4 * 4  # layers x conv channels x kernel x fp32
    ssm = 2 * 4 * 16 * 16 * 4  # layers x heads x head_dim x state x fp32
    assert [r["state_mib"] * 2**20 for r in rows["mamba2"]] == [conv + ssm] * 2
    for r in rows["transformer"] + rows["mamba2"]:
        assert r["ms_per_token_median"] > 0 and r["peak_rss_mib"] >= r["decode_rss_mib"] > 0


def _row(model, context, ms, state, rss):
    return {"model": model, "context": context, "ms_per_token_median": ms, "ms_per_token_mean": ms, "prefill_s": 0.5,
            "state_mib": state, "peak_rss_mib": rss, "decode_rss_mib": rss}


def test_summary_ratios_and_verdict(bench, tmp_path):
    rows = [_row("transformer", 512, 4.0, 1.0, 400), _row("transformer", 16384, 10.0, 32.0, 500),
            _row("mamba2", 16384, 5.5, 0.5, 410), _row("mamba2", 512, 5.0, 0.5, 400)]
    summary = bench.summarize(rows, 1.2, 1.1)
    assert summary["transformer"] == {"contexts": [512, 16384], "time_ratio": 2.5, "rss_ratio": 1.25, "state_flat": False}
    assert summary["mamba2"]["time_ratio"] == pytest.approx(1.1) and summary["mamba2"]["state_flat"] and summary["pass"]
    assert not bench.summarize(rows, 1.05, 1.1)["pass"]  # 1.1x over a 1.05 bound
    assert not bench.summarize(rows[:2] + [_row("mamba2", 16384, 5.0, 0.6, 400), rows[3]], 1.2, 1.1)["pass"]  # grows
    assert not bench.summarize(rows[:2], 1.2, 1.1)["pass"]  # no Mamba-2 rows: nothing shown
    table = bench.markdown_table(rows, {"transformer": 1_034_624, "mamba2": 1_028_816})
    lines = table.splitlines()
    assert lines[2].startswith("| transformer (1.03M) | 512 | 4.00 |") and lines[5].startswith("| mamba2 (1.03M) | 16384 | 5.50 |")
    bench.plot(rows, tmp_path / "plot.png", 32)
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arguments_are_checked(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--new-tokens", "0"])
    assert bench.parse_args([]).contexts == [512, 2048, 8192, 16384]


def test_best_of_keeps_the_fastest_repeat_per_configuration(bench):
    runs = [_row("mamba2", 512, 9.0, 0.5, 400), _row("transformer", 512, 4.0, 1.0, 400),
            _row("mamba2", 512, 6.0, 0.5, 401), _row("transformer", 512, 7.0, 1.0, 402)]
    rows = bench.best_of(runs)
    assert [(r["model"], r["ms_per_token_median"], r["peak_rss_mib"], r["repeats_ms_median"]) for r in rows] == [
        ("mamba2", 6.0, 401, [9.0, 6.0]), ("transformer", 4.0, 400, [4.0, 7.0])]
