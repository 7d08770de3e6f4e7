"""End-to-end SFT on a tiny model: the loss falls, and resume continues exactly."""

import json

from tests.conftest import rewind_checkpoints
from train.__main__ import run

FAST = [
    "experiment=quickstart",
    "trainer.max_steps=8",
    "trainer.warmup_steps=2",
    "trainer.lr=2e-2",
    "trainer.row_tokens=512",
    "trainer.rows_per_micro_batch=1",
    "trainer.grad_accum=2",
    "trainer.eval_every=0",
    "trainer.save_every=4",
    "trainer.resume=null",
    "data.synthetic.train.num_samples=200",
    "data.synthetic.eval.num_samples=4",
    "rollout.max_new_tokens=8",
]


def test_short_sft_lowers_loss_and_writes_a_loadable_checkpoint(compose, tmp_path):
    cfg = compose(FAST + [f"run_dir={tmp_path}/a"])
    summary = run(cfg)
    losses = summary["losses"]
    assert len(losses) == 8
    assert losses[-1] < 0.75 * losses[0]
    assert summary["checkpoint"].endswith("step_8") and 0.0 <= summary["eval/accuracy"] <= 1.0
    rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    logged = {k for r in rows for k in r}
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/padding_fraction", "eval/accuracy"} <= logged
    from train.models.model_zoo import load_model

    load_model(summary["checkpoint"])  # HF format


def test_resume_continues_with_the_same_losses(compose, tmp_path):
    full = run(compose(FAST + [f"run_dir={tmp_path}/full"]))
    # A second run that "dies" right after its step-4 checkpoint: drop what came after, resume.
    run(compose(FAST + [f"run_dir={tmp_path}/cut"]))
    rewind_checkpoints(tmp_path / "cut", 4)
    resumed = run(compose(FAST + [f"run_dir={tmp_path}/cut", "trainer.resume=auto"]))
    assert resumed["losses"] == full["losses"][4:]  # exact on CPU: same data position, RNG and optimizer state


def test_multi_turn_chats_train_in_a_single_pass(compose, tmp_path):
    summary = run(compose(FAST + [f"run_dir={tmp_path}/mt", "data.synthetic.train.turns=3", "data.multi_turn=single_pass",
                                  "trainer.save_every=0"]))
    assert summary["losses"][-1] < 0.75 * summary["losses"][0]


def test_schedule_steps_stops_early_on_the_schedule_of_a_longer_run(compose, tmp_path):
    """trainer.schedule_steps=8 with max_steps=4: the first 4 steps of the 8-step run, lr and losses alike."""
    import pytest

    from train.run.config_checks import ConfigError

    full = run(compose(FAST + [f"run_dir={tmp_path}/full", "trainer.save_every=0"]))
    short = run(compose(FAST + [f"run_dir={tmp_path}/short", "trainer.save_every=0", "trainer.max_steps=4",
                                "trainer.schedule_steps=8"]))
    assert short["losses"] == full["losses"][:4]
    lrs = lambda d: [r["train/lr"] for r in map(json.loads, open(tmp_path / d / "metrics.jsonl")) if "train/lr" in r]
    assert lrs("short") == lrs("full")[:4] and lrs("short")[-1] > lrs("full")[-1]
    with pytest.raises(ConfigError, match=r"trainer\.schedule_steps=3 must be >= trainer\.max_steps=4"):
        run(compose(FAST + [f"run_dir={tmp_path}/bad", "trainer.max_steps=4", "trainer.schedule_steps=3"]))
