"""Config checks of the long-sequence keys (train/run/config_checks.py): bad values fail in one line naming the key,
for SFT (check_sft) and RL (check_rl) runs; the defaults and good values pass."""

import pytest

from train.run.config_checks import ConfigError, check_rl, check_sft


@pytest.mark.parametrize("override, key", [
    ("trainer.logits_chunk_tokens=0", "trainer.logits_chunk_tokens"),
    ("trainer.logits_chunk_tokens=-3", "trainer.logits_chunk_tokens"),
    ("trainer.logits_chunk_tokens=2.5", "trainer.logits_chunk_tokens"),
    ("trainer.logits_chunk_tokens=true", "trainer.logits_chunk_tokens"),
    ("trainer.gradient_checkpointing=sometimes", "trainer.gradient_checkpointing"),
])
@pytest.mark.parametrize("experiment, check", [("quickstart", check_sft), ("quickstart_rl", check_rl)])
def test_bad_long_sequence_values_name_the_key(compose, experiment, check, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check(compose([f"experiment={experiment}", override]))


@pytest.mark.parametrize("experiment, check", [("quickstart", check_sft), ("quickstart_rl", check_rl)])
def test_good_values_pass(compose, experiment, check):
    check(compose([f"experiment={experiment}"]))  # the defaults: null, false
    check(compose([f"experiment={experiment}", "trainer.logits_chunk_tokens=4096", "trainer.gradient_checkpointing=true"]))


def test_checkpointing_refuses_a_forced_shared_prompt(compose):
    cfg = compose(["experiment=quickstart_rl", "trainer.gradient_checkpointing=true", "trainer.share_prompt=true"])
    with pytest.raises(ConfigError, match=r"trainer\.share_prompt"):
        check_rl(cfg)


def test_checkpointing_turns_the_automatic_shared_prompt_off(compose, tmp_path):
    from transformers import AutoConfig

    from train.rl.setup import share_prompt

    AutoConfig.for_model("qwen2", hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=8, num_hidden_layers=1, vocab_size=16).save_pretrained(tmp_path)
    assert share_prompt(compose(["experiment=quickstart_rl"]), str(tmp_path), multi_turn=False)
    assert not share_prompt(compose(["experiment=quickstart_rl", "trainer.gradient_checkpointing=true"]), str(tmp_path),
                            multi_turn=False)
