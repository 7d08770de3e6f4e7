"""Frozen parameters under ZeRO 1-3: keep them exactly where they are through the optimizer step.

A curriculum phase freezes parameters by clearing ``requires_grad`` after the engine exists (train/sft/curriculum.py).
Plain torch AdamW (ZeRO-0) then skips them: no gradient, so no step, and their moment estimates stay as they were.
ZeRO 1-3 instead step one flat fp32 partition per parameter group, in which a parameter without a gradient gets a
zero one: Adam's decaying moments (and weight decay) would still move it. ``FrozenParameters`` hooks the torch
optimizer DeepSpeed steps (``engine.basic_optimizer``): before each step it copies the frozen parameters' slices of
the flat fp32 partition and of every optimizer state tensor of that partition (``exp_avg``, ``exp_avg_sq``), after
it puts them back (zeros where the state did not exist yet, as a parameter that never had a gradient has none).
DeepSpeed copies the fp32 partition to the model weights after the step, so the weights stay put too.

What differs from ZeRO-0: Adam's step count is one per flat group, so when a phase unfreezes a parameter its bias
correction counts the steps it was frozen (ZeRO-0 counts only its own steps). Once Adam's bias corrections are near
1 (tens of steps), the two agree.
"""

from __future__ import annotations

import torch


def partition_slice(zero_optimizer, param, stage: int) -> tuple[torch.Tensor, int, int] | None:
    """(the flat fp32 partition holding this rank's part of ``param``, start, length), None if this rank holds none."""
    if stage == 3:
        position = zero_optimizer.grad_position.get(getattr(param, "ds_id", None))  # None: not an optimizer parameter
        if position is None or not position[2]:
            return None
        group, start, length = position
        return zero_optimizer.fp32_partitioned_groups_flat[group], start, length
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    address = mapping.get_hp_fragment_address()
    return zero_optimizer.single_partition_of_fp32_groups[mapping.param_group_index], address.start, address.numel


class FrozenParameters:
    """Optimizer hooks that undo every step on the parameters of ``module`` whose ``requires_grad`` is False.

    ``update()`` re-reads which parameters are frozen (call it after a phase changes ``requires_grad``); hooks are
    installed while any parameter is frozen and removed when none is.
    """

    def __init__(self, engine, stage: int):
        self.engine, self.stage = engine, stage
        self.slices: list[tuple[torch.Tensor, int, int]] = []  # this rank's slices of the frozen parameters
        self.saved: list[tuple[torch.Tensor, int, int, dict]] = []  # (flat, start, length, {key: copy}) of a step
        self.handles: list = []

    def update(self) -> int:
        """Re-read the frozen parameters; returns how many parameter tensors are frozen."""
        frozen = [p for p in self.engine.module.parameters() if not p.requires_grad]
        zero_optimizer = self.engine.optimizer
        self.slices = [s for s in (partition_slice(zero_optimizer, p, self.stage) for p in frozen) if s is not None]
        optimizer = self.engine.basic_optimizer
        if frozen and not self.handles:
            self.handles = [optimizer.register_step_pre_hook(self._save),
                            optimizer.register_step_post_hook(self._restore)]
        elif not frozen:
            for handle in self.handles:
                handle.remove()
            self.handles = []
        return len(frozen)

    def _stepped(self, optimizer) -> set[int]:
        """ids of the flat partitions this optimizer step updates (ZeRO steps one parameter group at a time)."""
        return {id(p) for group in optimizer.param_groups for p in group["params"]}

    def _save(self, optimizer, args, kwargs) -> None:
        stepped = self._stepped(optimizer)
        self.saved = []
        for flat, start, length in self.slices:
            if id(flat) not in stepped:
                continue
            state = optimizer.state.get(flat, {})
            copies = {key: value.narrow(0, start, length).clone() for key, value in state.items()
                      if torch.is_tensor(value) and value.shape == flat.shape}
            copies[None] = flat.detach().narrow(0, start, length).clone()
            self.saved.append((flat, start, length, copies))

    @torch.no_grad()
    def _restore(self, optimizer, args, kwargs) -> None:
        for flat, start, length, copies in self.saved:
            flat.narrow(0, start, length).copy_(copies[None])
            for key, value in optimizer.state.get(flat, {}).items():
                if torch.is_tensor(value) and value.shape == flat.shape:
                    target = value.narrow(0, start, length)
                    target.copy_(copies[key]) if key in copies else target.zero_()
        self.saved = []
