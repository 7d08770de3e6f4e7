"""Checkpoints: the model in Hugging Face format plus everything needed to resume exactly.

Layout: ``{run_dir}/checkpoints/step_{N}/`` holds ``config.json``, weights, tokenizer files, ``trainer_state.pt``
(optimizer, scheduler, RNG states, data position, step, extra recipe state) and ``save_record.json`` (the step
and the save's sequence number, its place in write order). ``checkpoints/latest`` is a text file naming the
current checkpoint directory.

Guarantee: a kill at any instant of ``save`` leaves ``latest()`` returning a complete checkpoint: the previous
one, or the new one once committed; this holds when the same step is saved again. How: every file goes into a
temporary directory and is fsynced with it; an existing ``step_{N}`` is renamed aside (never deleted) before the
new one is renamed in; ``latest`` is replaced atomically (write, fsync, ``os.replace``, fsync the folder); a
deletion renames the directory out of sight before removing it. ``latest()`` follows the pointer and, when that
names no complete checkpoint, takes the directory a killed re-save renamed aside, else the last one written. The
next save restores or removes what a killed save left behind. The fsyncs are there so that a power loss keeps
the same order on a disk that honours them (tested: kills, not power loss). ``keep_last`` deletes by write
order, never the checkpoint just written nor the one ``latest`` names, so a run resumed from an older step keeps
what it writes. One process writes a run's checkpoints at a time (the stale-file cleanup assumes it).

A save that cannot write (disk full, run dir unwritable or not a directory) raises ``CheckpointWriteError`` naming
the directory, the reason and the checkpoint still intact; its partial files are removed, nothing earlier is touched.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

TRAINER_STATE = "trainer_state.pt"
SAVE_RECORD = "save_record.json"  # {"step": N, "seq": K}: K orders saves by time, whatever their steps

# The points a save passes, in order; ``save(..., on_stage=f)`` calls ``f(name)`` right after each (tests inject
# kills there). latest() moves to the new checkpoint at "renamed" when latest already names step_N or there is
# no pointer yet, else at "pointed".
STAGES = (
    "cleaned",  # what a killed save left (temporary, aside, trash dirs, pointer tmp files) restored or removed
    "wrote_model",  # model and tokenizer files in the temporary dir
    "wrote_state",  # trainer_state.pt
    "wrote_extra",  # write_extra's files and the save record
    "synced",  # every file and folder in the temporary dir fsynced
    "moved_aside",  # an existing step_N renamed aside (nothing to do for a new step)
    "renamed",  # the temporary dir is step_N
    "pointed",  # latest names step_N
    "removed_aside",  # the old step_N deleted
    "pruned",  # keep_last applied
)

class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (``python -m train`` prints it as one line)."""


_STEP_DIR = re.compile(r"step_(\d+)")
_ASIDE_DIR = re.compile(r"\.aside_step_(\d+)_\d+")


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir, step: int, model, tokenizer, trainer_state: dict, keep_last: int = 2, write_extra=None,
         on_stage=None) -> Path:
    """Write ``step_{step}``, point ``latest`` at it and keep the last ``keep_last`` written (0: all).

    ``write_extra(tmp_dir)`` adds files (DeepSpeed state, momentum weights) before the commit, so they are covered
    by it. ``on_stage(name)`` is called after each of ``STAGES``."""
    root = Path(run_dir) / "checkpoints"
    try:
        return _save(root, step, model, tokenizer, trainer_state, keep_last, write_extra, on_stage or (lambda name: None))
    except Exception as err:
        os_error = _os_error(err)
        if os_error is None or isinstance(err, CheckpointWriteError):
            raise
        for partial in root.glob(f".tmp_step_{step}_{os.getpid()}") if root.is_dir() else []:
            shutil.rmtree(partial, ignore_errors=True)
        intact = latest(run_dir) if root.is_dir() else None
        kept = f"the last checkpoint, {intact}, is intact" if intact else "no earlier checkpoint exists"
        raise CheckpointWriteError(
            f"checkpoint step_{step}: could not write under {root} ({os_error.strerror or os_error}); {kept}: free disk "
            "space or make run_dir writable, then rerun with trainer.resume=auto") from err


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError behind ``err``: itself, or one in its cause chain (a trainer rank's failed DeepSpeed write
    arrives wrapped by Ray, the original as ``.cause``)."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError):
            return err
        err = getattr(err, "cause", None) or err.__cause__
        seen += 1
    return None


def _save(root: Path, step: int, model, tokenizer, trainer_state: dict, keep_last: int, write_extra, stage) -> Path:
    run_dir = root.parent
    root.mkdir(parents=True, exist_ok=True)
    _fsync_dir(root.parent)
    _recover(root)
    stage("cleaned")

    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}_{os.getpid()}"
    seq = 1 + max((_seq(path) for path in _candidates(root)), default=0)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    stage("wrote_model")
    torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / TRAINER_STATE)
    stage("wrote_state")
    if write_extra is not None:
        write_extra(tmp)
    (tmp / SAVE_RECORD).write_text(json.dumps({"step": step, "seq": seq}))
    stage("wrote_extra")
    _fsync_tree(tmp)
    stage("synced")

    aside = root / f".aside_step_{step}_{os.getpid()}"
    if final.exists():
        os.replace(final, aside)
        _fsync_dir(root)
    stage("moved_aside")
    os.replace(tmp, final)
    _fsync_dir(root)
    stage("renamed")
    _write_pointer(root, final.name)
    stage("pointed")
    _remove(aside)
    stage("removed_aside")
    if keep_last > 0:
        keep = {final, latest(run_dir)}
        by_write_order = sorted(_step_dirs(root), key=_order)
        for old in by_write_order[: max(len(by_write_order) - keep_last, 0)]:
            if old not in keep:
                _remove(old)
    stage("pruned")
    return final


def latest(run_dir) -> Path | None:
    """The complete checkpoint ``latest`` names; else the one renamed aside for that step by a killed save; else
    the last one written; None when the run has none."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if _is_complete(named):
            return named
        asides = [aside for aside in _aside_dirs(root) if aside.name.startswith(f".aside_{named.name}_")]
        if asides:
            return max(asides, key=_order)
    candidates = _candidates(root)
    return max(candidates, key=_order) if candidates else None


def resolve_resume(resume, run_dir) -> Path | None:
    """``trainer.resume``: null (fresh start), "auto" (latest in run_dir, if any) or a checkpoint path."""
    if resume in (None, False, ""):
        return None
    if resume == "auto":
        return latest(run_dir)
    path = Path(resume)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(
            f"trainer.resume={resume!r} is not a checkpoint directory (no trainer_state.pt); give "
            "{run_dir}/checkpoints/step_N, 'auto' or null"
        )
    return path


def load_trainer_state(path) -> dict:
    return torch.load(Path(path) / TRAINER_STATE, weights_only=False)


def resolve_model_dir(path) -> Path:
    """``model.path`` may name a checkpoint, a run directory or its ``checkpoints/`` folder: the latter two mean
    the run's latest checkpoint (so an RL experiment can point at the SFT run it starts from)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    run_dir = path.parent if path.name == "checkpoints" else path
    found = latest(run_dir)
    return found if found is not None else path


# -- internals ---------------------------------------------------------------------------------------------------


def _is_complete(path: Path) -> bool:
    # step_N and aside dirs only ever appear by renaming a fully written, fsynced directory
    return (path / TRAINER_STATE).is_file()


def _seq(path: Path) -> int:
    """The save's place in write order; 0 for checkpoints written before save records existed."""
    try:
        return int(json.loads((path / SAVE_RECORD).read_text())["seq"])
    except (OSError, ValueError, KeyError):
        return 0


def _order(path: Path) -> tuple[int, int]:
    match = _STEP_DIR.fullmatch(path.name) or _ASIDE_DIR.fullmatch(path.name)
    return _seq(path), int(match.group(1))


def _step_dirs(root: Path) -> list[Path]:
    return [path for path in root.glob("step_*") if _STEP_DIR.fullmatch(path.name) and _is_complete(path)]


def _aside_dirs(root: Path) -> list[Path]:
    return [path for path in root.glob(".aside_step_*") if _ASIDE_DIR.fullmatch(path.name) and _is_complete(path)]


def _step_dir_of(aside: Path) -> Path:
    return aside.parent / f"step_{_ASIDE_DIR.fullmatch(aside.name).group(1)}"


def _candidates(root: Path) -> list[Path]:
    """Every complete checkpoint: the step dirs, and dirs renamed aside whose step has no dir (a killed re-save)."""
    return _step_dirs(root) + [aside for aside in _aside_dirs(root) if not _step_dir_of(aside).exists()]


def _recover(root: Path) -> None:
    """Undo what a killed save left: an aside dir goes back to step_N when that is missing (the last one renamed
    aside when there are several), else it is removed; temporary dirs, pointer tmp files and trash are removed."""
    for aside in sorted(_aside_dirs(root), key=_order, reverse=True):
        final = _step_dir_of(aside)
        if final.exists():
            _remove(aside)
        else:
            os.replace(aside, final)
            _fsync_dir(root)
    for leftover in root.glob(".*"):
        if leftover.name.startswith((".tmp_step_", ".aside_step_", ".trash_")):
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.name.startswith(".latest.tmp"):
            leftover.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    """Delete a directory out of sight: rename it to trash (atomic) first, so a kill while deleting never leaves a
    half-deleted checkpoint under a name latest() reads."""
    if not path.exists():
        return
    trash = path.with_name(f".trash_{path.name}_{os.getpid()}")
    os.replace(path, trash)
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f".latest.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "latest")
    _fsync_dir(root)


def _fsync_tree(top: Path) -> None:
    for folder, _, files in os.walk(top, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
