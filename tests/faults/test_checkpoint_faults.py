"""A checkpoint save that cannot write (disk full while the weights or the DeepSpeed state are written, a run dir that
cannot be created): one clear error naming the directory, the reason and the checkpoint still intact; the partial
files are gone and the previous checkpoint still loads and resumes (train/run/checkpoint.py)."""

import errno

import pytest
import torch

from tests.conftest import TEST_ARCH
from train.models.model_zoo import build_tiny_model, load_model
from train.run import checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    return {tag: build_tiny_model(tiny_tokenizer, TEST_ARCH, seed) for seed, tag in enumerate(("old", "new"))}


def disk_full(_tmp_dir):
    raise OSError(errno.ENOSPC, "No space left on device")


class RemoteFailure(RuntimeError):
    """As a trainer rank's failure reaches the driver: Ray's error, the rank's own exception as ``.cause``."""

    def __init__(self, cause):
        super().__init__("a policy trainer rank failed during save_state")
        self.cause = cause


def disk_full_on_a_trainer_rank(_tmp_dir):
    raise RemoteFailure(OSError(errno.ENOSPC, "No space left on device"))


class FullDiskModel:
    """A model whose weights stop half-written because the disk filled up."""

    def __init__(self, model):
        self.model = model

    def save_pretrained(self, path):
        self.model.config.save_pretrained(path)  # config.json made it to disk, the weights did not
        raise OSError(errno.ENOSPC, "No space left on device")


def _assert_only_step_1(run_dir, models):
    path = checkpoint.latest(run_dir)
    assert path == run_dir / "checkpoints" / "step_1"
    assert checkpoint.load_trainer_state(path)["tag"] == "old"
    loaded, expected = load_model(path).state_dict(), models["old"].state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_1"]  # no partial files
    assert checkpoint.resolve_resume("auto", run_dir) == path


@pytest.mark.parametrize("where", ["weights", "deepspeed_state", "deepspeed_state_on_a_rank"])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_says_so(where, models, tiny_tokenizer, tmp_path):
    checkpoint.save(tmp_path, 1, models["old"], tiny_tokenizer, {"tag": "old"})
    model = FullDiskModel(models["new"]) if where == "weights" else models["new"]
    extra = {"deepspeed_state": disk_full, "deepspeed_state_on_a_rank": disk_full_on_a_trainer_rank}.get(where)
    with pytest.raises(checkpoint.CheckpointWriteError,
                       match=rf"^checkpoint step_2: could not write under {tmp_path}/checkpoints \(No space left on "
                             rf"device\); the last checkpoint, {tmp_path}/checkpoints/step_1, is intact: free disk "
                             r"space or make run_dir writable, then rerun with trainer\.resume=auto$"):
        checkpoint.save(tmp_path, 2, model, tiny_tokenizer, {"tag": "new"}, write_extra=extra)
    _assert_only_step_1(tmp_path, models)
    checkpoint.save(tmp_path, 2, models["new"], tiny_tokenizer, {"tag": "new"})  # space freed: the next save works
    assert checkpoint.load_trainer_state(checkpoint.latest(tmp_path))["tag"] == "new"


def test_a_run_dir_that_cannot_be_created_is_one_clear_error(models, tiny_tokenizer, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    run_dir = tmp_path / "a_file" / "run"
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"^checkpoint step_1: could not write under .*a_file/run/"
                       r"checkpoints \(Not a directory\); no earlier checkpoint exists"):
        checkpoint.save(run_dir, 1, models["old"], tiny_tokenizer, {"tag": "old"})


def test_other_errors_during_a_save_keep_their_type(models, tiny_tokenizer, tmp_path):
    def bug(_tmp_dir):
        raise ZeroDivisionError("a bug, not the disk")

    with pytest.raises(ZeroDivisionError):
        checkpoint.save(tmp_path, 1, models["old"], tiny_tokenizer, {"tag": "old"}, write_extra=bug)


def test_a_checkpoint_write_error_prints_as_one_line(tmp_path):
    from train.__main__ import is_user_error, user_message

    err = checkpoint.CheckpointWriteError("checkpoint step_2: could not write under x (No space left on device); ...")
    assert is_user_error(err) and "\n" not in user_message(err)
