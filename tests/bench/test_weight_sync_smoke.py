"""bench/weight_sync.py on a model of width 32 at world size 2 with 2 workers, object store and gloo broadcast: it syncs (the
bench checks every worker's weights against the trainer's after each sync) and reports the parameter count of the
model it built."""


import pytest

from tests.bench.bench_modules import load_bench


def test_arch_widens_the_tiny_model():
    bench = load_bench("weight_sync")
    arch = bench.arch_of(256, 4)
    assert (arch["hidden_size"], arch["intermediate_size"], arch["num_attention_heads"], arch["num_key_value_heads"]) == (256, 1024, 8, 4)
    with pytest.raises(SystemExit, match="multiple of 32"):
        bench.arch_of(100, 4)


@pytest.mark.usefixtures("one_thread")
def test_weight_sync_bench_runs_and_counts_parameters(model_cache, capsys):
    pytest.importorskip("ray")
    from train.models.model_zoo import embedded_model_path, load_model

    bench = load_bench("weight_sync")
    rows = bench.main(["--widths", "32", "--world-sizes", "2", "--workers", "2", "--repeats", "1", "--layers", "1",
                       "--methods", "object_store", "gloo", "--cache-dir", str(model_cache)])
    # width 32 (one head, one KV head), 1 layer, 386 tokens (384 BPE + 2 special), tied embeddings: 386*32 embedding, per layer q, k, v
    # 32*32+32 each (Qwen2's biases), o 32*32, MLP 3*32*128, 2 RMSNorms of 32, and the final norm 32
    layer = 3 * (32 * 32 + 32) + 32 * 32 + 3 * 32 * 128 + 2 * 32
    want = 386 * 32 + layer + 32
    path = embedded_model_path(str(model_cache), bench.arch_of(32, 1), vocab_size=384, seed=0)
    assert sum(p.numel() for p in load_model(path).parameters()) == want
    assert [(r["world_size"], r["method"], r["params"]) for r in rows] == [(2, "object_store", want), (2, "gloo", want)]
    assert all(r["total_s"] == pytest.approx(r["gather_s"] + r["load_s"]) and r["gather_s"] > 0 for r in rows)  # one repeat
    out = capsys.readouterr().out
    assert f"| 32 | {want:,} | 0.1 | 2 | gloo |" in out and "world size" in out
