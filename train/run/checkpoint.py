"""Checkpoints: the model in Hugging Face format plus everything needed to resume exactly.

Layout: ``{run_dir}/checkpoints/step_{N}/`` holds ``config.json``, weights, tokenizer files and
``trainer_state.pt`` (optimizer, scheduler, RNG states, data position, step, extra recipe state).
Writes are atomic: a checkpoint is written to a temporary directory and renamed into place, and the
``latest`` pointer is replaced atomically after that, so a kill during a save leaves the previous
checkpoint intact and ``latest`` pointing at it.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch


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


def save(run_dir, step: int, model, tokenizer, trainer_state: dict, keep_last: int = 2, write_extra=None) -> Path:
    """Write ``step_{step}`` atomically, point ``latest`` at it and keep the newest ``keep_last``.

    ``write_extra(tmp_dir)`` adds files (DeepSpeed state, momentum weights) before the rename, so they are
    covered by the same atomic commit."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / "trainer_state.pt")
    if write_extra is not None:
        write_extra(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".latest.tmp{os.getpid()}"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    if keep_last > 0:
        steps = sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
        for old in steps[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir) -> Path | None:
    """The checkpoint ``latest`` points at, or None when the run has none."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "trainer_state.pt").exists() else None


def resolve_resume(resume, run_dir) -> Path | None:
    """``trainer.resume``: null (fresh start), "auto" (latest in run_dir, if any) or a checkpoint path."""
    if resume in (None, False, ""):
        return None
    if resume == "auto":
        return latest(run_dir)
    path = Path(resume)
    if not (path / "trainer_state.pt").exists():
        raise FileNotFoundError(
            f"trainer.resume={resume!r} is not a checkpoint directory (no trainer_state.pt); give "
            "{run_dir}/checkpoints/step_N, 'auto' or null"
        )
    return path


def load_trainer_state(path) -> dict:
    return torch.load(Path(path) / "trainer_state.pt", weights_only=False)


def resolve_model_dir(path) -> Path:
    """``model.path`` may name a checkpoint, a run directory or its ``checkpoints/`` folder: the latter two mean
    the run's latest checkpoint (so an RL experiment can point at the SFT run it starts from)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    run_dir = path.parent if path.name == "checkpoints" else path
    found = latest(run_dir)
    return found if found is not None else path
