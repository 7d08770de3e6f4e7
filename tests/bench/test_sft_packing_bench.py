"""bench/sft_packing.py's bookkeeping: padded batches as a plain HF loop builds them, and the padding fraction and
tokens/s it reports (golden values by hand). The timing itself is not tested."""

import pytest
import torch

from data_pipelines.packing import IGNORE_INDEX, Document, collate
from tests.bench.bench_modules import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("sft_packing")


def docs():
    return [
        Document([5, 6, 7], [False, True, True], sample_id="a"),
        Document([8, 9], [False, True], sample_id="b"),
        Document([1, 2, 3, 4, 5], [False, False, True, True, True], sample_id="c"),
    ]


def test_padded_batch_right_pads_and_masks_labels(bench):
    batch = bench.padded_batch(docs()[:2], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert bench.tokens_of(batch) == (5, 6)  # 1 pad position of 6


def test_padding_fraction_by_hand(bench):
    assert bench.padding_fraction(5, 6) == pytest.approx(1 / 6)
    assert bench.padding_fraction(8, 8) == 0.0 and bench.padding_fraction(0, 0) == 0.0
    # a packed batch: rows [a b] (5 tokens) and [c] (5 tokens), no padding; [a] [b] -> 1 pad in 6
    packed = collate([[docs()[0]], [docs()[1]]], pad_token_id=0)
    assert bench.padding_fraction(packed.num_tokens - packed.num_padding, packed.num_tokens) == pytest.approx(1 / 6)


def test_padded_batches_cycle_over_a_seeded_shuffle(bench):
    batches = bench.padded_batches(docs(), batch_size=2, pad_token_id=0, seed=3, num_batches=3)
    seen = [tuple(row[row != 0].tolist()) for b in batches for row in b["input_ids"]]
    # 6 rows: the first 3 are one epoch (each document once), the next epoch starts after
    assert sorted(seen[:3]) == sorted(tuple(d.input_ids) for d in docs())
    assert len(set(seen[3:6])) == 3 and set(seen[3:6]) == set(seen[:3])
    again = bench.padded_batches(docs(), 2, 0, 3, 3)  # seeded: the same batches
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again))


def test_throughput_sums_tokens_over_time(bench):
    out = bench.throughput([90, 100], [100, 100], [0.5, 1.5])
    assert out["tokens_per_s"] == pytest.approx(190 / 2.0)
    assert out["padding"] == pytest.approx(10 / 200)
    assert out["tokens_per_step"] == 95 and out["s_per_step"] == 1.0


def test_padding_free_rows_count_every_position(bench):
    # TRL's padding-free collator output: one flattened row, position_ids restart per document, no attention mask
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
    assert bench.tokens_of(batch) == (5, 5)
