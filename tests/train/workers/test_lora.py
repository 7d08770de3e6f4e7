"""LoRA on the policy trainer (``model.lora.*``, train/models/lora.py): a step changes only the adapters, the weights
it syncs are W + (alpha / r) B A under the base names, and a rollout worker holding them computes the peft model's
logits."""

import pytest
import torch

from data_pipelines.packing import collate
from tests.conftest import TEST_ARCH, arithmetic_documents, tiny_model_path
from train.models.model_zoo import load_model
from train.sft.curriculum import Freeze
from train.sft.loss import TokenCrossEntropy, loss_tokens

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("one_thread")
TRAINER = {"lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.0, "max_grad_norm": 0.0, "warmup_steps": 0}
LORA = {"rank": 4, "alpha": 12.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "o_proj"]}
TARGETS = ("q_proj", "v_proj", "o_proj")


def _parameters(module) -> dict:
    """Every parameter of the rank's (peft) model with its requires_grad; runs on the rank (apply_to_model)."""
    return {n: (p.detach().cpu().clone(), p.requires_grad) for n, p in module.named_parameters()}


def _batches(tokenizer, count: int = 2) -> list:
    docs = arithmetic_documents(tokenizer, 2 * count, seed=3)
    return [collate([[docs[2 * i], docs[2 * i + 1]]], tokenizer.pad_token_id) for i in range(count)]


def _train(group, batches, steps: int) -> None:
    tokens = sum(loss_tokens(b) for b in batches)
    for _ in range(steps):
        group.train_step(batches, TokenCrossEntropy(tokens), [{} for _ in batches])


@pytest.fixture(scope="module")
def path(model_cache):
    return tiny_model_path(model_cache, seed=2)


def test_lora_step_trains_only_adapters_and_syncs_merged_weights(ray_session, path, tiny_tokenizer):
    from peft import set_peft_model_state_dict

    from train.models.lora import wrap
    from train.workers.actors import TrainerGroup
    from train.workers.rollout_worker import RolloutWorker

    batches = _batches(tiny_tokenizer)
    group = TrainerGroup(1, path, "sdpa", {**TRAINER, "zero_stage": 0, "lora": LORA}, micro_batches_per_rank=2)
    try:
        group.apply_to_model(Freeze(0))  # a curriculum phase without patterns unfreezes all; the base must stay frozen
        before = group.apply_to_model(_parameters)
        _train(group, batches, steps=2)  # B starts at 0, so A gets its first gradient in step 2
        after = group.apply_to_model(_parameters)
        merged = group.full_state_dict()
    finally:
        group.shutdown()

    adapters = {n for n in after if ".lora_" in n}
    assert {n for n, (_, trainable) in after.items() if trainable} == adapters
    assert len(adapters) == 2 * len(TARGETS) * TEST_ARCH["num_hidden_layers"]
    for name, (value, _) in after.items():
        if name in adapters:
            assert not torch.equal(value, before[name][0]), f"adapter {name} did not change"
        else:
            assert torch.equal(value, before[name][0]), f"base weight {name} changed"

    # merged weights: the base model's names, W + (alpha / r) B A in float64 for the adapted layers, W elsewhere
    base = dict(load_model(path).named_parameters())
    assert set(merged) == set(base)
    scale = LORA["alpha"] / LORA["rank"]
    adapted = 0
    for name, weight in base.items():
        module = name.removesuffix(".weight")
        if module.endswith(TARGETS) and name.endswith(".weight"):
            peft_name = f"base_model.model.{module}"
            a = after[f"{peft_name}.lora_A.default.weight"][0].double()
            b = after[f"{peft_name}.lora_B.default.weight"][0].double()
            expected = weight.detach().double() + scale * b @ a
            torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=1e-6)
            assert (merged[name].double() - weight.detach().double()).abs().max() > 1e-4  # the update is visible
            adapted += 1
        else:
            assert torch.equal(merged[name], weight.detach()), name
    assert adapted == len(TARGETS) * TEST_ARCH["num_hidden_layers"]

    # a rollout worker holding the merged weights computes the adapter model's logits
    worker = RolloutWorker(path, 0, "cpu", num_threads=1, precision="fp32")
    worker.load_weights(merged, 2)
    peft_model = wrap(load_model(path), LORA).eval()
    set_peft_model_state_dict(peft_model, {n.replace(".default", ""): v for n, (v, _) in after.items() if n in adapters})
    ids = batches[0].input_ids
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    torch.testing.assert_close(worker.logits(ids), want, rtol=0, atol=1e-5)
    assert (want - load_model(path)(input_ids=ids).logits).abs().max() > 1e-3  # and differ from the base model's


@pytest.mark.slow  # three trainer groups: ~60 s on the shared 2 cores
def test_lora_under_zero3_matches_one_process_and_resumes(ray_session, path, tiny_tokenizer, tmp_path):
    """peft adapters on 2 ZeRO-3 ranks (partitioned frozen base, gathered for the merge) take the step of one rank;
    the saved state (DeepSpeed + peft adapter) restores the same weights in a fresh group started from the base."""
    from peft import PeftModel

    from train.workers.actors import TrainerGroup

    batches = _batches(tiny_tokenizer, count=2)
    merged = {}
    for world, stage in [(1, 0), (2, 3)]:
        settings = {**TRAINER, "zero_stage": stage, "lora": LORA}
        group = TrainerGroup(world, path, "sdpa", settings, micro_batches_per_rank=2 // world)
        try:
            _train(group, batches, steps=2)
            merged[stage] = group.full_state_dict()
            if stage == 3:
                group.save_state(str(tmp_path))
        finally:
            group.shutdown()
    base = dict(load_model(path).named_parameters())
    assert set(merged[3]) == set(base)
    assert max((merged[3][n] - base[n].detach()).abs().max() for n in base) > 1e-3  # ZeRO-3 trained the adapters
    for name in base:
        # Adam steps bounded by lr: reduction-order noise gives at most a small fraction of lr per element
        torch.testing.assert_close(merged[3][name], merged[0][name], rtol=0, atol=1e-4, msg=name)

    group = TrainerGroup(2, path, "sdpa", settings, micro_batches_per_rank=1)
    try:
        group.load_state(str(tmp_path), step=2)
        restored = group.full_state_dict()
    finally:
        group.shutdown()
    for name in base:
        assert torch.equal(restored[name], merged[3][name]), name
    # the adapter written at ZeRO-3 (gathered on rank 0) merges, through peft, to the same weights
    adapter = PeftModel.from_pretrained(load_model(path), tmp_path / "adapter").merge_and_unload()
    for name, param in adapter.named_parameters():
        torch.testing.assert_close(param.detach(), merged[3][name], rtol=0, atol=1e-6, msg=name)
