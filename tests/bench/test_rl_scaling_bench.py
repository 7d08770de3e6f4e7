"""bench/rl_scaling.py's bookkeeping: the one-axis-at-a-time grid, the model overrides, peak RSS reading and the
ratio table (by hand). The timed runs themselves are too slow for the suite."""

import os

import pytest

from tests.bench.bench_modules import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("rl_scaling")


def test_grid_varies_one_axis_at_a_time_from_the_default(bench):
    points = bench.grid([64, 256, 512], [96, 384, 1024], [4, 8, 16], default=(64, 96, 8))
    assert points == [(64, 96, 8), (64, 96, 4), (64, 96, 16), (256, 96, 8), (512, 96, 8), (64, 384, 8), (64, 1024, 8)]
    assert bench.grid([128], [], [], default=(64, 96, 8)) == [(64, 96, 8), (128, 96, 8)]


def test_arch_overrides_scale_the_mlp_with_the_width(bench):
    assert bench.arch_overrides(256) == ["model.tiny.arch.hidden_size=256", "model.tiny.arch.intermediate_size=1024"]
    with pytest.raises(ValueError, match="multiple of 4"):
        bench.arch_overrides(66)


def test_peak_rss_reads_this_process_and_none_for_a_missing_one(bench):
    import resource

    mine = bench.peak_rss_mib(os.getpid())
    # VmHWM and ru_maxrss are the same kernel counter (kB)
    assert mine == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rel=0.05)
    assert bench.peak_rss_mib(2**22 + 12345) is None


def test_ratio_rows_take_medians_and_divide_trl_by_ours(bench):
    results = [{"point": {"width": 64, "length": 96, "group": 8}, "params": 1000,
                "ours": {"walls": [1.0, 3.0, 2.0], "rss_total": 900.0, "rss_max": 400.0},
                "trl": {"walls": [4.0, 5.0, 9.0], "rss_total": 600.0}}]
    (row,) = bench.ratio_rows(results)
    assert row["ours_s"] == 2.0 and row["trl_s"] == 5.0 and row["speedup"] == pytest.approx(2.5)
    assert (row["ours_rss"], row["ours_rss_max"], row["trl_rss"]) == (900.0, 400.0, 600.0)
    assert "2.50x" in bench.table([row])


def test_plot_writes_a_png_of_the_three_axes(bench, tmp_path):
    rows = [{"width": w, "length": n, "group": g, "ours_s": 1.0 + i, "trl_s": 2.0 + i, "speedup": (2.0 + i) / (1.0 + i),
             "ours_rss": 900.0, "ours_rss_max": 400.0, "trl_rss": 600.0, "params": 1}
            for i, (w, n, g) in enumerate(bench.grid([64, 256], [96, 384], [4, 8]))]
    bench.plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
