import pytest
import torch

from data_pipelines.packing import (
    IGNORE_INDEX,
    Document,
    balanced_bins,
    collate,
    pack,
    pack_rows,
    response_loss_masks,
)
from tests.conftest import TEST_ARCH, arithmetic_documents
from train.models.attention import allowed, model_inputs
from train.models.model_zoo import build_tiny_model


def _documents(tokenizer, n, seed=0, turns=1):
    return arithmetic_documents(tokenizer, n, seed, turns=turns)


def test_pack_rows_respects_budget_and_keeps_every_document():
    lengths = [5, 9, 3, 7, 7, 1, 10, 2]
    rows = pack_rows(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 5  # total 44 tokens: 5 rows is optimal here
    with pytest.raises(ValueError, match="row budget"):
        pack_rows([11], 10)


def test_balanced_bins_put_the_largest_first_into_the_lightest_bin():
    assert balanced_bins([10, 10, 10, 40], 2) == [[3], [0, 1, 2]]
    assert balanced_bins([5, 7, 9], 3) == [[2], [1], [0]]
    assert balanced_bins([3, 3, 2, 2, 2], 2) == [[0, 2, 4], [1, 3]]  # 3 -> b0, 3 -> b1, 2 -> b0, 2 -> b1, 2 -> b0
    assert balanced_bins([4], 2) == [[0], []]


def test_response_loss_masks_drop_truncated_responses_only_when_asked():
    assert response_loss_masks([3, 0, 2], [False, True, True]) == [[True] * 3, [], [True] * 2]
    assert response_loss_masks([3, 0, 2], [False, True, True], mask_truncated=True) == [[True] * 3, [], [False] * 2]


def test_collate_layout_labels_positions_and_padding(tiny_tokenizer):
    docs = _documents(tiny_tokenizer, 3)
    batch = collate([[docs[0], docs[1]], [docs[2]]], tiny_tokenizer.pad_token_id)
    n0, n1, n2 = (len(d) for d in docs)
    seq = n0 + n1
    assert batch.input_ids.shape == (2, max(seq, n2))
    # positions restart per document, padding restarts too
    assert batch.position_ids[0, :n0].tolist() == list(range(n0))
    assert batch.position_ids[0, n0:seq].tolist() == list(range(n1))
    # labels: the token id exactly where the document trains, IGNORE_INDEX everywhere else (incl. padding)
    expected = [t if l else IGNORE_INDEX for d in (docs[0], docs[1]) for t, l in zip(d.input_ids, d.loss_mask)]
    assert batch.labels[0, :seq].tolist() == expected
    assert (batch.labels[1, n2:] == IGNORE_INDEX).all()
    assert batch.num_padding == 2 * batch.input_ids.shape[1] - (n0 + n1 + n2)
    assert batch.plain and batch.sample_ids == [d.sample_id for d in docs]


def test_mask_is_block_diagonal_causal(tiny_tokenizer):
    docs = [Document([1, 2, 3], [False, True, True]), Document([4, 5], [False, True])]
    batch = collate([docs], pad_token_id=0, pad_to=7)
    mask = allowed(batch.segment_ids, batch.visibility)[0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],  # padding sees only padding, so no softmax row is empty
        [0, 0, 0, 0, 0, 1, 1],
    ]


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_logits_equal_logits_alone(tiny_tokenizer, backend):
    model = build_tiny_model(tiny_tokenizer, TEST_ARCH, seed=1).eval()
    model.config._attn_implementation = {"sdpa": "sdpa", "flex": "flex_attention"}[backend]
    docs = _documents(tiny_tokenizer, 7, seed=5)
    batches = pack(docs, row_tokens=400, rows_per_batch=4, pad_token_id=tiny_tokenizer.pad_token_id)
    assert sum(len(b.sample_ids) for b in batches) == 7 and any(len(b.sample_ids) > len(b.input_ids) for b in batches)
    by_id = {d.sample_id: d for d in docs}
    with torch.no_grad():
        for batch in batches:
            packed = model(**model_inputs(batch, backend)).logits
            model.config._attn_implementation = "sdpa"
            for doc_index, sample_id in enumerate(batch.sample_ids):
                row, cols = (batch.doc_ids == doc_index).nonzero(as_tuple=True)
                alone = model(input_ids=torch.tensor([by_id[sample_id].input_ids])).logits[0]
                torch.testing.assert_close(packed[row[0], cols], alone, rtol=1e-5, atol=1e-5)
            model.config._attn_implementation = {"sdpa": "sdpa", "flex": "flex_attention"}[backend]


def test_per_document_gathers_each_documents_trained_positions():
    from train.models.forward import per_document

    docs = [Document([1, 2, 3, 4], [False, False, True, True], sample_id="a"),
            Document([5, 6, 7], [False, True, True], sample_id="b"),
            Document([8, 9], [False, True], sample_id="c")]
    batch = collate([[docs[0], docs[1]], [docs[2]]], pad_token_id=0)
    values = torch.arange(2 * 6, dtype=torch.float).reshape(2, 6)  # position t of the row, seq-1 = 6
    out, mask = per_document(values, batch)
    # a: tokens 3,4 at row positions 2,3 -> predicted from positions 1,2; b: tokens 6,7 at 5,6 -> 4,5; c: token 9 at 1 -> 0
    assert out.tolist() == [[1.0, 2.0], [4.0, 5.0], [6.0, 0.0]]
    assert mask.tolist() == [[True, True], [True, True], [True, False]]
