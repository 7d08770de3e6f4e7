"""Device, precision and seeding shared by the recipes."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """The training device; on CPU also flushes denormal floats to zero: once the loss is near zero, Adam's
    moment estimates underflow into denormals, which x86 CPUs process ~20x slower (seen as steps slowing from
    0.2 s to 4 s at the end of the quickstart)."""
    torch.set_flush_denormal(True)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("cluster.device=cuda but no CUDA GPU is visible; use cluster.device=cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"cluster.device={name!r} must be auto, cpu or cuda")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """Training compute dtype: bf16 autocast on GPU, fp32 on CPU for ``auto``."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("fp32", "bf16"):
        raise ValueError(f"trainer.precision={name!r} must be auto, fp32 or bf16")
    return torch.bfloat16 if name == "bf16" else torch.float32


PRECISIONS = ("auto", "fp32", "bf16")  # trainer.precision; fp16 is not supported (no loss scaling anywhere)
COMPONENTS = ("trainer", "rollout", "reference", "evaluation")


def component_dtype(component: str, precision: str, device: torch.device | str) -> torch.dtype:
    """The one precision policy: the dtype ``component`` computes in on ``device`` under ``trainer.precision``.

    On a GPU, ``auto`` and ``bf16`` give bf16 for every component: the trainer (DeepSpeed's bf16 mode, which keeps
    fp32 master weights and optimizer state; the model is loaded in fp32 and DeepSpeed casts its compute copy), the
    rollout workers (HF or vLLM), the reference actor and evaluation (loaded, or autocast, in bf16). ``fp32`` gives
    fp32 everywhere. On CPU every component runs in fp32 whatever ``precision`` says. Log-softmax, log-probs and
    losses are computed in fp32 in every case (train/models/forward.py upcasts the logits)."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; one of {COMPONENTS}")
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r} must be auto, fp32 or bf16 (fp16 is not supported)")
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.float32 if precision == "fp32" else torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
