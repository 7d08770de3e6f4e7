"""LoRA SFT and RL from the command line (``model.lora.rank=8``): the run trains, its checkpoint is the merged model
(loads with AutoModelForCausalLM) plus the adapter (loads with peft onto the base and merges to the same weights),
a resume continues with the same losses, and bad ``model.lora.*`` values fail in one line naming the key."""

import os

import pytest
import torch

from tests.conftest import rewind_checkpoints
from train.__main__ import run
from train.run.config_checks import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = [
    "experiment=quickstart",
    "trainer.warmup_steps=0",
    "trainer.lr=2e-2",
    "trainer.row_tokens=256",
    "data.max_seq_len=256",
    "trainer.rows_per_micro_batch=1",
    "trainer.grad_accum=2",
    "trainer.world_size=1",
    "trainer.eval_every=0",
    "trainer.resume=null",
    "data.synthetic.train.num_samples=64",
    "data.synthetic.eval.num_samples=2",
    "rollout.max_new_tokens=4",
    "model.lora.rank=8",
    "model.lora.alpha=16",
]


@pytest.fixture
def ray_cleanup():
    """RL runs leave the local Ray up (as tests/train/rl/test_rl.py); stop it after the test."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    yield
    import ray

    ray.shutdown()


def test_lora_sft_checkpoint_loads_merged_and_as_adapter(compose, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.models.model_zoo import load_model, resolve_model_path

    cfg = compose(FAST + ["trainer.max_steps=3", "trainer.save_every=0", f"run_dir={tmp_path}/a"])
    summary = run(cfg)
    assert summary["step"] == 3 and len(summary["losses"]) == 3
    ckpt = tmp_path / "a" / "checkpoints" / "step_3"
    assert (ckpt / "adapter" / "adapter_config.json").exists() and (ckpt / "adapter" / "adapter_model.safetensors").exists()

    merged = AutoModelForCausalLM.from_pretrained(ckpt)
    base_path = resolve_model_path(cfg.model)
    base = load_model(base_path)
    adapter = PeftModel.from_pretrained(load_model(base_path), ckpt / "adapter").eval()
    assert adapter.peft_config["default"].r == 8 and set(adapter.peft_config["default"].target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    ids = torch.tensor([[5, 17, 40, 99, 7, 3, 250, 12]])
    with torch.no_grad():
        want = adapter(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=0, atol=1e-5)
        assert (want - base(input_ids=ids).logits).abs().max() > 1e-3  # the run changed the model
    # only the adapted layers differ from the base model
    merged_params, base_params = dict(merged.named_parameters()), dict(base.named_parameters())
    changed = {n for n in base_params if not torch.equal(merged_params[n], base_params[n])}
    assert changed and all(n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in changed)


def test_lora_sft_resumes_with_the_same_losses(compose, tmp_path):
    full = run(compose(FAST + ["trainer.max_steps=4", "trainer.save_every=2", f"run_dir={tmp_path}/full"]))
    cut = tmp_path / "cut"
    run(compose(FAST + ["trainer.max_steps=4", "trainer.save_every=2", f"run_dir={cut}"]))
    rewind_checkpoints(cut, 2)
    resumed = run(compose(FAST + ["trainer.max_steps=4", "trainer.save_every=2", f"run_dir={cut}", "trainer.resume=auto"]))
    # the ranks start from the base model and restore the adapters + optimizer from the DeepSpeed state
    assert resumed["losses"] == full["losses"][2:]


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.lora.rank=0", r"model\.lora\.rank=0 must be an integer >= 1"),
        ("model.lora.alpha=0", r"model\.lora\.alpha=0 must be > 0"),
        ("model.lora.dropout=1.0", r"model\.lora\.dropout=1\.0 must be in \[0, 1\)"),
        ("model.lora.target_modules=[]", r"model\.lora\.target_modules=\[\] must be a non-empty list"),
        ("model.lora.target_modules=[q_proj,qkv]", (r"model\.lora\.target_modules: \['qkv'\] match no linear layer of "
                                                    r"Qwen2ForCausalLM; its linear module names are \[.*'q_proj'")),
    ],
)
def test_bad_lora_config_fails_naming_the_key(compose, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message) as err:
        run(compose(FAST + ["trainer.max_steps=1", override, f"run_dir={tmp_path}/bad"]))
    assert "\n" not in str(err.value)


def test_one_lora_rl_step(compose, tmp_path, ray_cleanup):
    """GRPO with LoRA: one step trains the adapters, syncs merged weights to the rollout workers and checkpoints both."""
    from transformers import AutoModelForCausalLM

    from tests.train.rl.test_rl import FAST_RL, VARIED_REWARD
    from train.models.model_zoo import load_model, resolve_model_path

    # the random model never answers correctly: a length reward that varies within a group gives a gradient
    cfg = compose(FAST_RL + VARIED_REWARD + ["trainer.max_steps=1", "rollout.max_new_tokens=24", "model.lora.rank=8",
                                             f"run_dir={tmp_path}/rl"])
    out = run(cfg)
    assert out["step"] == 1
    ckpt = tmp_path / "rl" / "checkpoints" / "step_1"
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
    assert out["history"][0]["train/grad_norm"] > 0  # the adapters got a gradient
    merged = dict(AutoModelForCausalLM.from_pretrained(ckpt).named_parameters())
    base = dict(load_model(resolve_model_path(cfg.model)).named_parameters())
    changed = {n for n in base if not torch.equal(merged[n], base[n])}
    assert changed and all(n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in changed)


@pytest.mark.slow
def test_lora_rl_resume_replays_the_next_step(compose, tmp_path, ray_cleanup):
    """A LoRA RL run cut after step 1 and resumed gives step 2 of the uninterrupted run: the trainer restarts from the
    base model and restores the adapters and optimizer; the rollout workers get the merged weights of step 1."""
    from tests.train.rl.test_rl import FAST_RL, VARIED_REWARD

    base = FAST_RL + VARIED_REWARD + ["trainer.max_steps=2", "rollout.max_new_tokens=24", "model.lora.rank=8"]
    full = run(compose(base + [f"run_dir={tmp_path}/full"]))
    run(compose(base + [f"run_dir={tmp_path}/cut"]))
    rewind_checkpoints(tmp_path / "cut", 1)
    resumed = run(compose(base + [f"run_dir={tmp_path}/cut", "trainer.resume=auto"]))
    assert resumed["step"] == 2 and len(resumed["history"]) == 1
    expected, got = full["history"][1], resumed["history"][0]
    assert expected["train/grad_norm"] > 0  # step 2 moved the adapters
    for key in ("reward/total", "train/loss", "train/grad_norm", "rollout/response_length_mean"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
