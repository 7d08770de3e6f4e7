"""One precision policy (train/models/runtime.py ``component_dtype``): the dtype every component uses per device and
``trainer.precision``, the components that read it, and fp32 log-probs and losses under a bf16 model."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from data_pipelines.packing import Document, pack
from tests.conftest import TEST_ARCH
from train.models.forward import sft_loss_sum, token_logprobs
from train.models.model_zoo import build_tiny_model, resolve_model_path
from train.models.runtime import COMPONENTS, component_dtype
from train.run.config_checks import ConfigError, check_precision
from train.workers.policy_trainer import compute_dtype, deepspeed_config
from train.workers.reference_worker import reference_settings
from train.workers.vllm_worker import engine_dtype

BF16, FP32 = torch.bfloat16, torch.float32
# (precision, device) -> dtype, for every component: written out, not computed
POLICY = {
    ("auto", "cuda"): BF16, ("bf16", "cuda"): BF16, ("fp32", "cuda"): FP32,
    ("auto", "cpu"): FP32, ("bf16", "cpu"): FP32, ("fp32", "cpu"): FP32,
}


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("precision, device", list(POLICY))
def test_every_component_follows_the_one_policy(component, precision, device):
    assert component_dtype(component, precision, device) == POLICY[precision, device]
    assert component_dtype(component, precision, torch.device(device)) == POLICY[precision, device]


@pytest.mark.parametrize("precision, device", list(POLICY))
def test_the_components_read_the_policy(precision, device):
    on_gpu = device == "cuda"
    expected = POLICY[precision, device]
    assert compute_dtype(precision, on_gpu) == expected  # the policy trainer
    cfg = {"lr": 1e-5, "precision": precision}
    assert deepspeed_config(cfg, 1, 1, on_gpu)["bf16"]["enabled"] is (expected == BF16)  # DeepSpeed bf16: fp32 masters
    options = {"num_gpus": 1, "num_cpus": 1} if on_gpu else {"num_cpus": 0}
    assert reference_settings(options, precision)["dtype"] == expected
    if on_gpu:  # vLLM runs on GPUs only; dtype auto follows trainer.precision
        assert engine_dtype({"dtype": "auto"}, precision) == expected
        assert engine_dtype({"dtype": "float32"}, precision) == FP32


@pytest.mark.parametrize("bad", ["fp16", "float16", "bfloat16"])
def test_unsupported_precisions_name_the_key(bad):
    with pytest.raises(ValueError, match="trainer.precision"):
        component_dtype("rollout", bad, "cuda")
    with pytest.raises(ConfigError, match="trainer.precision"):
        check_precision(bad, on_gpu=True, bf16_supported=True)


def test_unknown_component_is_refused():
    with pytest.raises(ValueError, match="unknown component"):
        component_dtype("critic", "auto", "cuda")


def test_config_check_refuses_bf16_on_a_gpu_without_bf16():
    for precision in ("auto", "bf16"):
        with pytest.raises(ConfigError, match=f"trainer.precision={precision}: this GPU has no bf16 support"):
            check_precision(precision, on_gpu=True, bf16_supported=False)
    check_precision("fp32", on_gpu=True, bf16_supported=False)
    check_precision("bf16", on_gpu=True, bf16_supported=True)
    check_precision("bf16", on_gpu=False, bf16_supported=False)  # CPU: every component runs fp32 anyway


def test_config_check_refuses_fp32_flash_on_a_gpu():
    with pytest.raises(ConfigError, match="trainer.precision=fp32 with model.attn_backend=flash"):
        check_precision("fp32", on_gpu=True, bf16_supported=True, attn_backend="flash")
    check_precision("auto", on_gpu=True, bf16_supported=True, attn_backend="flash")
    check_precision("fp32", on_gpu=True, bf16_supported=True, attn_backend="sdpa")


def test_hf_rollout_worker_loads_in_the_rollout_dtype(model_cache):
    from train.workers.rollout_worker import RolloutWorker

    cfg = OmegaConf.create({"path": None, "cache_dir": str(model_cache), "tiny": {"vocab_size": 384, "seed": 5, "arch": TEST_ARCH}})
    worker = RolloutWorker(str(resolve_model_path(cfg)), device="cpu", precision="bf16")
    assert {p.dtype for p in worker.model.parameters()} == {FP32}  # CPU stays fp32


def test_evaluation_generates_under_the_evaluation_dtype(monkeypatch, tiny_tokenizer):
    from train.models import evaluate

    seen = []
    real = evaluate.autocast
    monkeypatch.setattr(evaluate, "autocast", lambda device, dtype: seen.append((device.type, dtype)) or real(device, dtype))
    model = build_tiny_model(tiny_tokenizer, dict(TEST_ARCH))
    evaluate.evaluate(model, tiny_tokenizer, [{"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}], max_new_tokens=2, precision="bf16")
    assert seen == [("cpu", FP32)]


def _packed(tokenizer):
    docs = [Document(list(range(5, 5 + n)), [False] * 2 + [True] * (n - 2)) for n in (9, 6, 12, 7)]
    return pack(docs, row_tokens=20, rows_per_batch=2, pad_token_id=tokenizer.pad_token_id)[0]


def test_logprobs_and_loss_are_fp32_when_the_model_runs_in_bf16(tiny_tokenizer):
    torch.manual_seed(0)
    fp32_model = build_tiny_model(tiny_tokenizer, dict(TEST_ARCH)).eval()
    bf16_model = build_tiny_model(tiny_tokenizer, dict(TEST_ARCH)).eval().to(BF16)
    bf16_model.load_state_dict({k: v.to(BF16) for k, v in fp32_model.state_dict().items()})
    batch = _packed(tiny_tokenizer)
    assert batch.input_ids.shape[0] == 2  # packed multi-row
    with torch.no_grad():
        lp32, _ = token_logprobs(fp32_model, batch, "sdpa")
        lp16, ent16 = token_logprobs(bf16_model, batch, "sdpa", with_entropy=True)
        loss32, n32 = sft_loss_sum(fp32_model, batch, "sdpa")
        loss16, n16 = sft_loss_sum(bf16_model, batch, "sdpa")
    assert lp16.dtype == FP32 and ent16.dtype == FP32 and loss16.dtype == FP32
    on = batch.labels[:, 1:] != -100
    # the bf16 model's weights and activations are rounded (rel. 2^-8): close to, not equal to, the fp32 model
    assert (lp16 - lp32)[on].abs().max() < 0.1 and not torch.equal(lp16, lp32)
    assert n16 == n32 and abs(float(loss16) - float(loss32)) / float(loss32) < 0.02
