"""train/run/checkpoint.py: a save killed at any of its stages (an exception from ``on_stage``, or a real SIGKILL
of a child process) leaves latest() naming a complete checkpoint that loads, the previous one until the new one is
committed, re-saving the same step included; the next save cleans up after it; keep_last deletes by write order."""

import multiprocessing
import os
import signal

import pytest
import torch
from transformers import AutoTokenizer

from tests.conftest import TEST_ARCH
from train.models.model_zoo import build_tiny_model, load_model
from train.run import checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# The first stage at which latest() names the new checkpoint: for a new step the pointer's replacement is the
# commit; when the pointer already names the step being saved again, the rename into step_N is.
COMMIT_NEW_STEP = checkpoint.STAGES.index("pointed")
COMMIT_SAME_STEP = checkpoint.STAGES.index("renamed")


class Killed(BaseException):
    """Not an Exception: nothing in save() may catch it and tidy up, as nothing would after a SIGKILL."""


def kill_at(stage):
    def on_stage(name):
        if name == stage:
            raise Killed(name)

    return on_stage


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    """Tiny Qwen2 models with different weights, so a test can tell which one a checkpoint holds."""
    return {tag: build_tiny_model(tiny_tokenizer, TEST_ARCH, seed) for seed, tag in enumerate(("old", "new", "next"))}


def _save(run_dir, step, tag, models, tokenizer, **kwargs):
    return checkpoint.save(run_dir, step, models[tag], tokenizer, {"tag": tag}, **kwargs)


def _assert_latest_loads(run_dir, step, tag, models):
    """latest() is a complete checkpoint of ``step`` written from ``models[tag]``: weights, tokenizer and state."""
    path = checkpoint.latest(run_dir)
    assert path is not None, "latest() found no checkpoint"
    state = checkpoint.load_trainer_state(path)
    assert (state["step"], state["tag"]) == (step, tag)
    loaded = load_model(path).state_dict()
    expected = models[tag].state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert len(AutoTokenizer.from_pretrained(path)) == models[tag].config.vocab_size
    assert checkpoint.resolve_resume("auto", run_dir) == path and checkpoint.resolve_model_dir(run_dir) == path


def _leftovers(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("."))


def _steps(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("stage", checkpoint.STAGES)
def test_a_save_of_a_new_step_killed_at_each_stage_leaves_a_loadable_latest(stage, models, tiny_tokenizer, tmp_path):
    _save(tmp_path, 1, "old", models, tiny_tokenizer)
    with pytest.raises(Killed):
        _save(tmp_path, 2, "new", models, tiny_tokenizer, on_stage=kill_at(stage))
    committed = checkpoint.STAGES.index(stage) >= COMMIT_NEW_STEP
    _assert_latest_loads(tmp_path, 2 if committed else 1, "new" if committed else "old", models)

    # the next save cleans up after the killed one; keep_last=2 keeps the last two written
    _save(tmp_path, 3, "next", models, tiny_tokenizer)
    _assert_latest_loads(tmp_path, 3, "next", models)
    renamed = checkpoint.STAGES.index(stage) >= checkpoint.STAGES.index("renamed")
    assert _steps(tmp_path) == (["step_2", "step_3"] if renamed else ["step_1", "step_3"])
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("stage", checkpoint.STAGES)
def test_re_saving_the_same_step_killed_at_each_stage_leaves_a_loadable_latest(stage, models, tiny_tokenizer, tmp_path):
    _save(tmp_path, 1, "old", models, tiny_tokenizer)
    _save(tmp_path, 2, "old", models, tiny_tokenizer)
    with pytest.raises(Killed):
        _save(tmp_path, 2, "new", models, tiny_tokenizer, on_stage=kill_at(stage))
    committed = checkpoint.STAGES.index(stage) >= COMMIT_SAME_STEP
    _assert_latest_loads(tmp_path, 2, "new" if committed else "old", models)

    # the next save puts an aside step_2 back (or drops it once the new one is in) and removes the rest
    _save(tmp_path, 3, "next", models, tiny_tokenizer)
    _assert_latest_loads(tmp_path, 3, "next", models)
    assert _steps(tmp_path) == ["step_2", "step_3"] and _leftovers(tmp_path) == []
    assert checkpoint.load_trainer_state(tmp_path / "checkpoints" / "step_2")["tag"] == ("new" if committed else "old")


def _save_and_block_at(run_dir, stage, models, tokenizer, reached):
    def on_stage(name):
        if name == stage:
            reached.send(name)
            signal.pause()  # until the parent's SIGKILL

    _save(run_dir, 2, "new", models, tokenizer, on_stage=on_stage)
    reached.send("finished")


@pytest.mark.parametrize("stage", ["wrote_extra", "moved_aside", "renamed", "removed_aside"])
def test_a_re_save_sigkilled_in_a_child_process_leaves_a_loadable_latest(stage, models, tiny_tokenizer, tmp_path):
    _save(tmp_path, 2, "old", models, tiny_tokenizer)
    context = multiprocessing.get_context("fork")  # the child has the models already; spawn would re-import torch
    reached, child_end = context.Pipe(duplex=False)
    child = context.Process(target=_save_and_block_at, args=(tmp_path, stage, models, tiny_tokenizer, child_end))
    child.start()
    try:
        assert reached.poll(30), f"the child did not reach stage {stage!r} in 30 s"
        assert reached.recv() == stage
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    assert child.exitcode == -signal.SIGKILL
    committed = checkpoint.STAGES.index(stage) >= COMMIT_SAME_STEP
    _assert_latest_loads(tmp_path, 2, "new" if committed else "old", models)

    _save(tmp_path, 3, "next", models, tiny_tokenizer)
    assert _steps(tmp_path) == ["step_2", "step_3"] and _leftovers(tmp_path) == []
    assert checkpoint.load_trainer_state(tmp_path / "checkpoints" / "step_2")["tag"] == ("new" if committed else "old")


def test_keep_last_after_resuming_from_an_older_step_keeps_what_the_resumed_run_writes(models, tiny_tokenizer,
                                                                                       tmp_path):
    for run_dir in (tmp_path / "a", tmp_path / "b"):
        _save(run_dir, 4, "old", models, tiny_tokenizer)
        _save(run_dir, 8, "old", models, tiny_tokenizer)
    # both runs resume from step_4 (trainer.resume=.../step_4); step_8 is from the abandoned continuation
    _save(tmp_path / "a", 5, "new", models, tiny_tokenizer, keep_last=1)
    _assert_latest_loads(tmp_path / "a", 5, "new", models)  # by step order, step_5 would go and step_8 stay
    assert _steps(tmp_path / "a") == ["step_5"]

    _save(tmp_path / "b", 5, "new", models, tiny_tokenizer)
    _save(tmp_path / "b", 6, "new", models, tiny_tokenizer)
    assert _steps(tmp_path / "b") == ["step_5", "step_6"]  # the last two written, not the two highest steps
    _save(tmp_path / "b", 8, "next", models, tiny_tokenizer)  # the resumed run reaches step 8 again
    _assert_latest_loads(tmp_path / "b", 8, "next", models)
    assert _steps(tmp_path / "b") == ["step_6", "step_8"]


def test_leftovers_of_killed_saves_do_not_confuse_latest_and_the_next_save_removes_them(models, tiny_tokenizer,
                                                                                        tmp_path):
    _save(tmp_path, 1, "old", models, tiny_tokenizer)
    with pytest.raises(Killed):  # leaves a fully written temporary dir
        _save(tmp_path, 7, "new", models, tiny_tokenizer, on_stage=kill_at("synced"))
    root = tmp_path / "checkpoints"
    # what other killed processes left: a half-written temporary dir, a half-deleted checkpoint in the trash, an
    # aside dir without its trainer state, a pointer tmp file naming a step that does not exist
    (root / ".tmp_step_8_99999").mkdir()
    (root / ".tmp_step_8_99999" / "config.json").write_text("{}")
    (root / ".trash_step_9_99999").mkdir()
    (root / ".trash_step_9_99999" / "trainer_state.pt").write_bytes(b"")
    (root / ".aside_step_1_99999").mkdir()
    (root / ".latest.tmp99999").write_text("step_9")
    assert len(_leftovers(tmp_path)) == 5
    _assert_latest_loads(tmp_path, 1, "old", models)

    (root / "latest").unlink()  # even without the pointer: the last complete checkpoint written
    _assert_latest_loads(tmp_path, 1, "old", models)

    _save(tmp_path, 2, "new", models, tiny_tokenizer)
    _assert_latest_loads(tmp_path, 2, "new", models)
    assert _leftovers(tmp_path) == [] and _steps(tmp_path) == ["step_1", "step_2"]
