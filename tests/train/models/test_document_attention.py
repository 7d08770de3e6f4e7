"""Per-document SDPA on plain packed rows (train/models/document_attention.py) equals the dense-mask path.

The reference is the same weights under transformers' own ``sdpa`` with our dense [rows, 1, seq, seq] mask (the
path before this one, still used for non-plain rows). Same bound and reasoning as tests/train/models/
test_flash_varlen.py (1e-5 of each tensor's largest entry, fp32; the q/k projections scaled up so a leak shows): a
forward that lets a row's documents see each other must miss it, which each test asserts too.
"""

from __future__ import annotations

import dataclasses

import torch

from data_pipelines.packing import Document, collate
from tests.train.models.test_flash_varlen import (  # noqa: F401 - sharp_model_paths is a fixture
    BOUND,
    _relative_errors,
    _rl_loss_and_grads,
    _rollouts,
    _sft_batches,
    _sft_loss_and_grads,
    sharp_model_paths,
)
from train.models.attention import model_inputs
from train.models.document_attention import PER_DOCUMENT_SDPA, SegmentPlan, width_buckets
from train.models.model_zoo import load_model
from train.models.sampling import left_padded, sample
from train.rl.algorithm import Algorithm
from train.rl.update_batches import pack_update


def _dense(model):
    """``model`` under transformers' own sdpa: ``model_inputs`` then hands it the dense mask."""
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    return model


def _one_segment_per_row(batch):
    """A broken variant of ``batch``: each row one causal segment (documents see each other), as transformers runs
    a multi-row batch whose only boundaries are restarting position ids."""
    rows = batch.segment_ids.shape[0]
    return dataclasses.replace(batch, segment_ids=torch.zeros_like(batch.segment_ids),
                               visibility=torch.ones(rows, 1, 1, dtype=torch.bool))


def test_width_buckets_and_the_segment_plan():
    # longest first; a new bucket below 0.8 x the open width; at width <= 32 everything left joins
    assert width_buckets([100, 90, 79, 81, 40, 30, 5, 1]) == [[0, 1, 3], [2], [4], [5, 6, 7]]
    assert width_buckets([10, 10, 3]) == [[0, 1, 2]]
    plan = SegmentPlan.of(torch.tensor([0, 3, 5, 6], dtype=torch.int32))  # segments of 3, 2, 1 tokens (one bucket)
    (gather,) = plan.gathers
    assert gather.tolist() == [[0, 1, 2], [3, 4, 4], [5, 5, 5]]  # padded slots repeat the segment's last token
    assert plan.source.tolist() == [0, 1, 2, 3, 4, 6] and plan.tokens == 6


def test_sft_micro_batches_equal_the_dense_mask(sharp_model_paths, tiny_tokenizer, one_thread):
    batches = _sft_batches(tiny_tokenizer)  # 2 micro-batches of 2 rows, several documents per row, row padding
    model = load_model(sharp_model_paths[0], "sdpa")
    assert model.config._attn_implementation == PER_DOCUMENT_SDPA
    assert "cu_seq_lens_q" in model_inputs(batches[0], "sdpa", PER_DOCUMENT_SDPA)
    loss, grads = _sft_loss_and_grads(model, batches, "sdpa")
    ref_loss, ref_grads = _sft_loss_and_grads(_dense(load_model(sharp_model_paths[0], "sdpa")), batches, "sdpa")
    assert abs(float(loss - ref_loss)) <= BOUND * abs(float(ref_loss)), (float(loss), float(ref_loss))
    errors = _relative_errors(grads, ref_grads)
    assert max(errors.values()) <= BOUND, max(errors.items(), key=lambda kv: kv[1])

    leaky = [_one_segment_per_row(b) for b in batches]
    leaky_loss, leaky_grads = _sft_loss_and_grads(load_model(sharp_model_paths[0], "sdpa"), leaky, "sdpa")
    assert abs(float(leaky_loss - ref_loss)) > BOUND * abs(float(ref_loss))
    assert max(_relative_errors(leaky_grads, ref_grads).values()) > BOUND


def test_rl_micro_batches_equal_the_dense_mask(sharp_model_paths, tiny_tokenizer, compose, one_thread):
    group_size = 4
    cfg = compose(["experiment=quickstart_rl", f"algorithm.group_size={group_size}", "algorithm.kl.beta=0.04"])
    algorithm = Algorithm.from_config(cfg.algorithm)
    rollouts = _rollouts(tiny_tokenizer, groups=3, group_size=group_size)
    longest = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    update = pack_update(rollouts, list(range(len(rollouts))), 2, share_prompt=False, group_size=group_size,
                         row_tokens=2 * longest, attn_backend="flash", pad_token_id=tiny_tokenizer.pad_token_id,
                         mask_truncated=False)
    assert all(b.input_ids.shape[0] >= 2 and len(b.sample_ids) > b.input_ids.shape[0] for b in update.micro)
    advantages = algorithm.advantages(torch.tensor([float(i % 3) for i in range(len(rollouts))]), None)
    policy_path, reference_path = sharp_model_paths

    def step(wrap=lambda m: m, batches=update):
        return _rl_loss_and_grads(wrap(load_model(policy_path, "sdpa")), wrap(load_model(reference_path, "sdpa")).eval(),
                                  algorithm, batches, advantages, "sdpa")

    lp, loss, grads = step()
    ref_lp, ref_loss, ref_grads = step(_dense)
    assert float((lp - ref_lp).abs().max()) <= BOUND * float(ref_lp.abs().max())
    assert abs(float(loss - ref_loss)) <= BOUND * abs(float(ref_loss)), (float(loss), float(ref_loss))
    errors = _relative_errors(grads, ref_grads)
    assert max(errors.values()) <= BOUND, max(errors.items(), key=lambda kv: kv[1])

    leaky_lp, _, _ = step(batches=update._replace(micro=[_one_segment_per_row(b) for b in update.micro]))
    assert float((leaky_lp - ref_lp).abs().max()) > BOUND * float(ref_lp.abs().max())


def test_multi_segment_rows_keep_the_dense_mask_and_generation_is_stock_sdpa(sharp_model_paths, tiny_tokenizer,
                                                                             tmp_path, one_thread):
    multi = Document([1, 2, 3, 4], [False, True, False, True], segment_ids=[0, 0, 1, 1], visibility=[[True, False], [True, True]])
    inputs = model_inputs(collate([[multi]], pad_token_id=0), "sdpa", PER_DOCUMENT_SDPA)
    assert "cu_seq_lens_q" not in inputs and inputs["attention_mask"].shape == (1, 1, 4, 4)

    prompts = left_padded(tiny_tokenizer, ["What is 12 + 7?", "1 + 1 = ?"], "cpu")
    kwargs = dict(max_new_tokens=12, eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    ours, stock = load_model(sharp_model_paths[0], "sdpa"), _dense(load_model(sharp_model_paths[0], "sdpa"))
    for temperature in (0.0, 1.0):
        got = sample(ours, **prompts, temperature=temperature, generator=torch.Generator().manual_seed(0), **kwargs)
        expected = sample(stock, **prompts, temperature=temperature, generator=torch.Generator().manual_seed(0), **kwargs)
        assert torch.equal(got, expected)
    # a checkpoint written from it loads anywhere: the implementation name is not saved
    ours.save_pretrained(tmp_path)
    assert PER_DOCUMENT_SDPA not in (tmp_path / "config.json").read_text()
