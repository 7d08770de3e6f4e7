"""Mamba-2 (attention-free) in the model zoo and the shared forward: build/save/reload, SFT, and the CPU fallback
from packed rows to one right-padded document per row (the torch reference scan cannot reset its state at
document boundaries)."""

import logging

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from data_pipelines.arithmetic import ArithmeticSpec, generate
from data_pipelines.chat_format import chat_ids
from data_pipelines.packing import IGNORE_INDEX, Document, collate, one_document_per_row, pack_balanced
from train.models import forward
from train.models.forward import per_document, sft_loss_sum, token_logprobs
from train.models.model_zoo import load_model, load_tokenizer, resolve_model_path

pytestmark = pytest.mark.usefixtures("one_thread")


MAMBA_TEST_ARCH = {
    "model_type": "mamba2",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "expand": 2,
    "num_heads": 4,
    "head_dim": 16,
    "state_size": 16,
    "n_groups": 1,
    "conv_kernel": 4,
    "chunk_size": 32,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def mamba_path(tmp_path_factory):
    cfg = OmegaConf.create({"path": None, "cache_dir": str(tmp_path_factory.mktemp("mamba")),
                            "tiny": {"vocab_size": 384, "seed": 1, "arch": MAMBA_TEST_ARCH}})
    return resolve_model_path(cfg)


def _documents(tokenizer, n, seed):
    docs = []
    for row in generate(ArithmeticSpec(digits=2, num_ops=2, verbosity=0.5), n, seed=seed):
        ids, loss = chat_ids(tokenizer, row["messages"])
        docs.append(Document(ids, loss, sample_id=row["id"]))
    return docs


def _alone(model, doc):
    """Per-token log-probs of ``doc`` run by itself (no packing, no padding): [len-1] float64."""
    logits = model(input_ids=torch.tensor([doc.input_ids]), use_cache=False).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(doc.input_ids[1:])[:, None])[:, 0]


def test_mamba2_builds_saves_and_reloads_identically(mamba_path, tmp_path):
    assert "mamba2" in mamba_path.name and (mamba_path / "tokenizer.json").exists()
    tokenizer = load_tokenizer(mamba_path)
    model = load_model(mamba_path, attn_backend="sdpa")  # attn_backend is ignored for an attention-free model
    assert type(model).__name__ == "Mamba2ForCausalLM"
    assert not any("attn" in name for name, _ in model.named_parameters())
    ids = torch.tensor([tokenizer.encode("<|im_start|>user\nWhat is 12 + 34?<|im_end|>\n", add_special_tokens=False)])
    with torch.no_grad():
        first = model(ids).logits
    model.save_pretrained(tmp_path / "resaved")
    tokenizer.save_pretrained(tmp_path / "resaved")
    again = load_model(resolve_model_path(OmegaConf.create({"path": str(tmp_path / "resaved"), "tiny": None})))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, first)


def test_padded_fallback_equals_each_document_alone(mamba_path, tiny_tokenizer, monkeypatch, caplog):
    model = load_model(mamba_path).eval()
    docs = _documents(tiny_tokenizer, 7, seed=3)
    rows = [[docs[0], docs[1], docs[2]], [docs[3], docs[4]], [docs[5], docs[6]]]  # 3 packed rows, tail padding
    batch = collate(rows, tiny_tokenizer.pad_token_id)
    monkeypatch.setattr(forward, "_padded_fallback_logged", False)
    with caplog.at_level(logging.WARNING, logger="train.models.forward"), torch.no_grad():
        loss_sum, loss_tokens = sft_loss_sum(model, batch, "sdpa")
        logprobs, _ = token_logprobs(model, batch, "sdpa")
    assert [r.getMessage() for r in caplog.records].count(forward.PADDED_FALLBACK_MESSAGE) == 1  # twice used, logged once

    # Independent reference: each document alone, float64 sums over its loss tokens.
    expected_sum, expected_tokens, expected_rows = 0.0, 0, []
    with torch.no_grad():
        for doc in docs:
            trained = torch.tensor(doc.loss_mask[1:])
            alone = _alone(model, doc)
            expected_sum += float(-alone[trained].sum())
            expected_tokens += int(trained.sum())
            expected_rows.append(alone[trained])
    assert loss_tokens == expected_tokens
    assert abs(float(loss_sum) - expected_sum) <= 1e-5 * expected_sum  # fp32 forward vs fp64 sum: 1e-5 relative
    per_doc, mask = per_document(logprobs, batch)  # the RL layout: [docs, max_loss_tokens]
    for i, want in enumerate(expected_rows):
        torch.testing.assert_close(per_doc[i][mask[i]].double(), want, rtol=0, atol=1e-5)

    # Without the fallback the scan carries state from one document into the next: later documents' log-probs move.
    with torch.no_grad():
        naive = torch.log_softmax(model(input_ids=batch.input_ids, use_cache=False).logits[:, :-1].float(), -1)
    naive = naive.gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    trained = batch.labels[:, 1:] != IGNORE_INDEX
    assert (naive - logprobs)[trained].abs().max() > 1e-3  # 100x the fallback's tolerance


def test_one_document_per_row_layout(tiny_tokenizer):
    docs = _documents(tiny_tokenizer, 3, seed=5)
    batch = collate([[docs[0], docs[1]], [docs[2]]], tiny_tokenizer.pad_token_id)
    padded, source = one_document_per_row(batch, pad_token_id=tiny_tokenizer.pad_token_id)
    assert padded.input_ids.shape == (3, max(len(d) for d in docs)) and padded.sample_ids == batch.sample_ids
    for i, doc in enumerate(docs):
        n = len(doc)
        assert padded.input_ids[i, :n].tolist() == doc.input_ids
        assert (padded.input_ids[i, n:] == tiny_tokenizer.pad_token_id).all() and (source[i, n:] == -1).all()
        assert batch.input_ids.reshape(-1)[source[i, :n]].tolist() == doc.input_ids
        assert padded.num_loss_tokens == batch.num_loss_tokens


def test_rl_reference_logprobs_on_balanced_micro_batches(mamba_path, tiny_tokenizer):
    from train.workers.reference_worker import ReferenceWorker

    docs = _documents(tiny_tokenizer, 6, seed=9)
    batches, members = pack_balanced(docs, 2, 1024, tiny_tokenizer.pad_token_id)  # what the RL driver hands over
    worker = ReferenceWorker(str(mamba_path))
    for batch, index, logprobs in zip(batches, members, worker.logprobs(batches)):
        per_doc, mask = per_document(logprobs, batch)
        for row, j in enumerate(index):
            with torch.no_grad():
                want = _alone(worker.model, docs[j])[torch.tensor(docs[j].loss_mask[1:])]
            torch.testing.assert_close(per_doc[row][mask[row]].double(), want, rtol=0, atol=1e-5)


def test_sft_with_mamba2_lowers_loss(compose, tmp_path):
    from tests.train.sft.test_sft import FAST

    from train.__main__ import run

    cfg = compose(FAST + ["model=tiny_mamba2", f"run_dir={tmp_path}/m", "trainer.save_every=0"], test_model=False)
    with open_dict(cfg):
        cfg.model.tiny.arch = dict(MAMBA_TEST_ARCH)
    summary = run(cfg)
    assert len(summary["losses"]) == 8 and summary["losses"][-1] < 0.75 * summary["losses"][0]
    assert type(load_model(summary["checkpoint"])).__name__ == "Mamba2ForCausalLM"


def test_single_pass_multi_turn_is_refused_for_mamba2(mamba_path, tiny_tokenizer):
    from data_pipelines.multiturn import chat_documents

    row = generate(ArithmeticSpec(turns=2), 1, seed=0)[0]
    doc = chat_documents(tiny_tokenizer, row["messages"], "single_pass", row["id"])[0]
    with pytest.raises(ValueError, match="data.multi_turn=per_turn"):
        sft_loss_sum(load_model(mamba_path), collate([[doc]], tiny_tokenizer.pad_token_id), "sdpa")
