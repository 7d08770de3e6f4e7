"""flash-attn varlen keeps packed documents apart: on CPU, through a stand-in kernel.

This machine has no GPU and no flash-attn, so each test installs, for its own duration only, a stand-in
``flash_attn`` package whose ``flash_attn_varlen_func`` computes causal attention inside each segment of
``cu_seqlens`` with torch SDPA (``flash_attn_func``: causal attention over each whole row, as the real kernel).
The model loads with ``attn_implementation="flash_attention_2"`` through our ``load_model``, and everything between
our ``model_inputs`` and the kernel is transformers' own code (``flash_attention_forward`` ->
``_flash_attention_forward`` -> the varlen call). What makes transformers accept the stand-in on CPU, and nothing
more: ``sys.modules`` holds it; entry 2 of ``FLASH_ATTENTION_COMPATIBILITY_MATRIX`` reports it available and CPU a
supported device (the load-time checks); ``modeling_flash_attention_utils.is_flash_attn_2_available`` is true (the
lazy import that picks ``flash_attn`` over the kernels hub); the lazily imported kernel functions are reset so the
stand-in is imported, and restored afterwards.

Packed multi-row micro-batches (several documents per row) must give the sdpa mask path's loss and gradients:
SFT (``sft_loss_sum``) and RL (reference and old log-prob forwards, then the GRPO loss with its KL term). The
bound is 1e-5 of each tensor's largest entry, fp32. Both paths compute the same softmax over the same keys (the
dense mask's extra keys get weight exactly 0), so they differ only in summation order (matmuls over segment-long
vs row-long keys): fp32 rounding (1.2e-7 per op), grown through two layers, the sharp attention below and the
backward's sums over tokens. Measured (1 and 2 threads alike): log-probs 1.5e-7, losses equal, gradients at most
3.3e-6 (median 9e-7). A kernel that ignores the boundaries (one causal attention over the flattened rows) must
miss the bound, which each test asserts too; measured: SFT loss 7.8e-4, RL log-probs 4.9e-2, gradients above 1.
The q/k projections are scaled up so that attention is sharp and a leak shows (at the default init attention is
nearly uniform and a leak moves the loss by ~1e-7).

Not run on a GPU yet: the real kernel's numerics (bf16) are for bench/gpu_check.py.
"""

from __future__ import annotations

import importlib.machinery
import random
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import modeling_flash_attention_utils as fa_utils

from data_pipelines.arithmetic import ArithmeticSpec, generate
from data_pipelines.chat_format import chat_ids, generation_prompt
from data_pipelines.multiturn import check_mode
from data_pipelines.packing import Document, collate, pack
from data_pipelines.shared_prompt import shared_prompt_batches
from tests.conftest import TEST_ARCH
from train.models.attention import check_backend, model_inputs, varlen_boundaries
from train.models.forward import per_document, sft_loss_sum, token_logprobs
from train.models.model_zoo import build_tiny_model, load_model
from train.rl.algorithm import Algorithm
from train.rl.update_batches import pack_update

BOUND = 1e-5  # relative to each tensor's largest entry; see the module docstring

# transformers' lazily imported kernel functions (module globals of modeling_flash_attention_utils)
_KERNEL_CACHE = ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
                 "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn")


def _heads_first_sdpa(q, k, v, causal, scale):
    """SDPA on [tokens, heads, dim] (k/v may have fewer heads: grouped-query attention, as flash-attn takes it)."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=causal,
                                         scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


def _check_varlen_call(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal, window_size, softcap):
    """What the real kernel needs of its arguments, checked where a GPU would silently misbehave."""
    assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
    bounds = cu_seqlens_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == q.shape[0], "the segments must cover every token"
    assert all(a < b for a, b in zip(bounds, bounds[1:])), "segments must be non-empty"
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    assert type(max_seqlen_q) is int and max_seqlen_q == max_seqlen_k == max(lengths)
    assert causal and dropout_p == 0.0 and tuple(window_size) == (-1, -1) and softcap == 0.0


def _make_stand_in(calls: list, ignore_boundaries: bool = False) -> types.ModuleType:
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
        """q [tokens, heads, dim], k/v [tokens, kv_heads, dim]: causal attention inside each segment
        [cu_seqlens[i], cu_seqlens[i + 1]) (the broken variant: over all tokens, ignoring the segments)."""
        _check_varlen_call(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal, window_size, softcap)
        calls.append(("varlen", cu_seqlens_q.clone(), max_seqlen_q))
        if ignore_boundaries:
            return _heads_first_sdpa(q, k, v, causal, softmax_scale)
        bounds = cu_seqlens_q.tolist()
        return torch.cat([_heads_first_sdpa(q[a:b], k[a:b], v[a:b], causal, softmax_scale)
                          for a, b in zip(bounds, bounds[1:])])

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, deterministic=False, return_attn_probs=False):
        """q [rows, seq, heads, dim]: causal attention over each whole row (what transformers falls back to)."""
        calls.append(("dense", q.shape))
        return torch.stack([_heads_first_sdpa(q[r], k[r], v[r], causal, softmax_scale) for r in range(q.shape[0])])

    def flash_attn_with_kvcache(*args, **kwargs):
        raise AssertionError("the packed forwards never use a KV cache")

    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)  # importlib.util.find_spec reads it
    module.__version__ = "2.8.3"
    module.flash_attn_varlen_func, module.flash_attn_func = flash_attn_varlen_func, flash_attn_func
    module.flash_attn_with_kvcache = flash_attn_with_kvcache
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input, padding.unpad_input = fa_utils._pad_input, fa_utils._unpad_input
    module.bert_padding = padding
    return module


@pytest.fixture
def flash_on_cpu(monkeypatch):
    """install(ignore_boundaries=False) -> the list of kernel calls: the stand-in kernel for this test."""
    entry = {**fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2], "general_availability_check": lambda *a, **k: True,
             "supported_devices": ((lambda: True, "cpu"),)}
    monkeypatch.setitem(fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX, 2, entry)
    monkeypatch.setattr(fa_utils, "is_flash_attn_2_available", lambda *a, **k: True)

    def install(ignore_boundaries: bool = False) -> list:
        calls: list = []
        module = _make_stand_in(calls, ignore_boundaries)
        monkeypatch.setitem(sys.modules, "flash_attn", module)
        monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", module.bert_padding)
        for name in _KERNEL_CACHE:  # the next forward imports this stand-in; the old cache comes back after the test
            monkeypatch.setattr(fa_utils, name, None)
        return calls

    return install


@pytest.fixture(scope="module")
def sharp_model_paths(tiny_tokenizer, tmp_path_factory):
    """Two saved tiny Qwen2 models (grouped-query attention; a policy and an RL reference) whose attention is
    sharp enough for a leak to show."""
    paths = []
    for seed in (3, 4):
        model = build_tiny_model(tiny_tokenizer, TEST_ARCH, seed=seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "q_proj" in name or "k_proj" in name:
                    param.mul_(20.0)
        paths.append(tmp_path_factory.mktemp(f"sharp_qwen2_seed{seed}"))
        model.save_pretrained(paths[-1])
    return paths


def _relative_errors(got: dict, expected: dict) -> dict:
    """max |got - expected| / max |expected| per tensor."""
    return {name: float((got[name] - e).abs().max() / e.abs().max()) for name, e in expected.items()}


def _assert_boundaries_follow_documents(calls, batches):
    """Every layer's kernel call was varlen with the documents (and each row's padding) of its batch."""
    assert calls and all(kind == "varlen" for kind, *_ in calls), "the dense flash_attn_func must not run packed rows"
    layers = TEST_ARCH["num_hidden_layers"]
    assert len(calls) % (layers * len(batches)) == 0
    per_batch = len(calls) // len(batches)
    for i, batch in enumerate(batches):
        flat = batch.doc_ids.reshape(-1)  # [rows * seq], -1 on padding
        row = torch.arange(flat.numel()) // batch.input_ids.shape[1]
        starts = [0] + [t for t in range(1, flat.numel()) if flat[t] != flat[t - 1] or row[t] != row[t - 1]]
        expected = starts + [flat.numel()]
        for _, cu, _ in calls[i * per_batch:(i + 1) * per_batch]:
            assert cu.tolist() == expected


def _sft_batches(tokenizer):
    docs = []
    for row in generate(ArithmeticSpec(verbosity=0.5), 8, seed=11):
        ids, loss = chat_ids(tokenizer, row["messages"])
        docs.append(Document(ids, loss, sample_id=row["id"]))
    longest = max(len(d) for d in docs)
    batches = pack(docs, row_tokens=2 * longest, rows_per_batch=2, pad_token_id=tokenizer.pad_token_id)
    assert len(batches) == 2 and all(b.input_ids.shape[0] == 2 for b in batches)
    assert all(len(b.sample_ids) > b.input_ids.shape[0] for b in batches)  # several documents per row
    assert any(b.num_padding > 0 for b in batches)
    return batches


def _sft_loss_and_grads(model, batches, backend):
    """The SFT objective over the micro-batches (sum of token cross-entropies / loss tokens) and its gradients."""
    model.zero_grad()
    sums = [sft_loss_sum(model, b, backend) for b in batches]
    loss = sum(s for s, _ in sums) / sum(n for _, n in sums)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_varlen_boundaries_are_documents_and_row_padding():
    docs = [Document([1, 2, 3], [False, True, True]), Document([4, 5], [False, True]), Document([6, 7, 8, 9], [True] * 4)]
    batch = collate([[docs[0], docs[1]], [docs[2]]], pad_token_id=0, pad_to=6)
    # row 0: docs of 3 and 2 tokens, 1 padding; row 1: 4 tokens, 2 padding; flat offsets 0..12
    got = varlen_boundaries(batch.segment_ids)
    assert got["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 10, 12] and got["cu_seq_lens_q"].dtype == torch.int32
    assert got["cu_seq_lens_k"] is got["cu_seq_lens_q"] and got["max_length_q"] == got["max_length_k"] == 4
    full = collate([[docs[2]], [docs[0]]], pad_token_id=0, pad_to=4)  # a row without padding still ends a segment
    assert varlen_boundaries(full.segment_ids)["cu_seq_lens_q"].tolist() == [0, 4, 7, 8]


def test_flash_sft_micro_batches_equal_the_sdpa_mask(flash_on_cpu, sharp_model_paths, tiny_tokenizer, one_thread):
    batches = _sft_batches(tiny_tokenizer)
    reference = load_model(sharp_model_paths[0], "sdpa")
    ref_loss, ref_grads = _sft_loss_and_grads(reference, batches, "sdpa")

    calls = flash_on_cpu()
    flash = load_model(sharp_model_paths[0], "flash")
    assert flash.config._attn_implementation == "flash_attention_2"
    loss, grads = _sft_loss_and_grads(flash, batches, "flash")
    _assert_boundaries_follow_documents(calls, batches)
    assert abs(float(loss - ref_loss)) <= BOUND * abs(float(ref_loss)), (float(loss), float(ref_loss))
    errors = _relative_errors(grads, ref_grads)
    assert max(errors.values()) <= BOUND, max(errors.items(), key=lambda kv: kv[1])

    flash_on_cpu(ignore_boundaries=True)  # a kernel that lets documents (and rows) see each other
    leaky_loss, leaky_grads = _sft_loss_and_grads(flash, batches, "flash")
    assert abs(float(leaky_loss - ref_loss)) > BOUND * abs(float(ref_loss))
    assert max(_relative_errors(leaky_grads, ref_grads).values()) > BOUND


def _rollouts(tokenizer, groups: int, group_size: int):
    """Arithmetic prompts, random responses of 6 to 40 tokens: G responses per prompt, contiguous."""
    rng = random.Random(5)
    rollouts = []
    for index, chat in enumerate(generate(ArithmeticSpec(digits=2), groups, seed=21)):
        prompt = tokenizer.encode(generation_prompt(tokenizer, chat["messages"][:-1]), add_special_tokens=False)
        for _ in range(group_size):
            response = [rng.randrange(3, len(tokenizer)) for _ in range(rng.randint(6, 40))]
            rollouts.append(SimpleNamespace(prompt_index=index, prompt_ids=prompt, response_ids=response,
                                            truncated=False, meta={}))
    return rollouts


def _rl_loss_and_grads(policy, reference, algorithm, update, advantages, backend):
    """One RL optimizer step on ``update`` as the actors run it: the reference model's log-probs
    (ReferenceWorker.logprobs) and the policy's old log-probs (PolicyTrainer.logprobs), both no-grad forwards,
    then each micro-batch's GRPO loss (clipped surrogate + KL in the loss) and backward. Returns all log-probs of
    the no-grad forwards, the summed loss and the gradients."""
    with torch.no_grad():
        ref = [token_logprobs(reference, b, backend)[0] for b in update.micro]  # [rows, seq-1] each
        old = [token_logprobs(policy, b, backend)[0] for b in update.micro]
    loss_fn = algorithm.loss(update)
    policy.zero_grad()
    total = 0.0
    for batch, members, ref_lp, old_lp in zip(update.micro, update.members, ref, old):
        logprobs, entropy = token_logprobs(policy, batch, backend, with_entropy=True)
        extra = {"old_logprobs": per_document(old_lp, batch)[0], "ref_logprobs": per_document(ref_lp, batch)[0],
                 "advantages": advantages[members]}
        loss, _ = loss_fn(logprobs, entropy, batch, extra)
        loss.backward()
        total = total + loss.detach()
    no_grad_logprobs = torch.cat([lp.reshape(-1) for lp in ref + old])
    return no_grad_logprobs, total, {n: p.grad.clone() for n, p in policy.named_parameters()}


def test_flash_rl_micro_batches_equal_the_sdpa_mask(flash_on_cpu, sharp_model_paths, tiny_tokenizer, compose, one_thread):
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
    assert advantages.abs().max() > 0
    policy_path, reference_path = sharp_model_paths

    def step(backend):
        return _rl_loss_and_grads(load_model(policy_path, backend), load_model(reference_path, backend).eval(),
                                  algorithm, update, advantages, backend)

    ref_lp, ref_loss, ref_grads = step("sdpa")
    calls = flash_on_cpu()
    lp, loss, grads = step("flash")
    # every forward (reference, old log-probs, update) got its micro-batch's boundaries
    _assert_boundaries_follow_documents(calls, update.micro * 3)
    assert float((lp - ref_lp).abs().max()) <= BOUND * float(ref_lp.abs().max())
    assert abs(float(loss - ref_loss)) <= BOUND * abs(float(ref_loss)), (float(loss), float(ref_loss))
    errors = _relative_errors(grads, ref_grads)
    assert max(errors.values()) <= BOUND, max(errors.items(), key=lambda kv: kv[1])

    flash_on_cpu(ignore_boundaries=True)
    leaky_lp, leaky_loss, leaky_grads = step("flash")
    assert float((leaky_lp - ref_lp).abs().max()) > BOUND * float(ref_lp.abs().max())
    assert abs(float(leaky_loss - ref_loss)) > BOUND * abs(float(ref_loss))
    assert max(_relative_errors(leaky_grads, ref_grads).values()) > BOUND


def test_what_flash_cannot_express_still_fails_early(compose, monkeypatch, sharp_model_paths, tiny_tokenizer):
    from train.rl.setup import share_prompt
    from train.run import config_checks
    from train.run.config_checks import ConfigError, check_rl

    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        check_backend("flash", "cpu")
    # the single-pass multi-turn mask: several segments with per-turn visibility in one document
    multi = Document([1, 2, 3, 4], [False, True, False, True], segment_ids=[0, 0, 1, 1], visibility=[[True, False], [True, True]])
    with pytest.raises(ValueError, match="plain packed documents only"):
        model_inputs(collate([[multi]], pad_token_id=0), "flash")
    with pytest.raises(ValueError, match="data.multi_turn=single_pass needs an arbitrary attention mask"):
        check_mode("single_pass", "flash")
    # shared-prompt batches (a prompt KV cache): refused for flash by the config check, never chosen by auto,
    # and by the forward itself
    shared = shared_prompt_batches(_rollouts(tiny_tokenizer, groups=1, group_size=2), 1, tiny_tokenizer.pad_token_id)[0][0]
    with pytest.raises(ValueError, match="trainer.share_prompt runs under model.attn_backend=sdpa only"):
        token_logprobs(None, shared, "flash")
    monkeypatch.setattr(config_checks, "check_backend", lambda backend, device: None)  # as on a GPU with flash-attn
    cfg = compose(["experiment=quickstart_rl", "model.attn_backend=flash", "trainer.share_prompt=true"])
    with pytest.raises(ConfigError, match="trainer.share_prompt=true is implemented for model.attn_backend=sdpa"):
        check_rl(cfg)
    cfg.trainer.share_prompt = "auto"
    assert share_prompt(cfg, str(sharp_model_paths[0]), multi_turn=False) is False
