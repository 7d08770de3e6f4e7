"""Ulysses sequence parallelism (``trainer.sequence_parallel_size``, SP): every packed row is split over the SP ranks
of a group along the sequence, so activations per rank shrink by SP while the numbers stay those of one process.

Layout (Jacobs et al. 2023, "DeepSpeed Ulysses", arXiv:2309.14509; Arctic Long Sequence Training, arXiv:2506.13996):
- the world of ``world_size`` ranks forms ``world_size / SP`` groups of SP consecutive ranks. Every rank of a group
  receives the SAME micro-batches (train/workers/actors.py ``TrainerGroup``): the data-parallel degree is
  ``world_size / SP``;
- inside the forward each SP rank keeps its contiguous slice of every row: tokens ``[r L, (r + 1) L)`` of a row
  padded to ``S = SP * L`` tokens (input ids and position ids sliced; the targets shifted BEFORE slicing, so the
  last position of a slice still predicts the first token of the next one);
- in each attention layer the all-to-all of DeepSpeed's ``UlyssesSPAttentionHF`` (deepspeed 0.19.8,
  ``deepspeed.runtime.sequence_parallel.ulysses_sp``) scatters the heads and gathers the sequence, so each rank
  attends over the whole row for heads/SP of the heads, then the reverse all-to-all brings back its slice;
- the per-token log-probs (and entropies) [rows, L] are all-gathered into [rows, seq - 1] by ``_GatherSequence``,
  whose backward keeps this rank's slice of the incoming gradient. Every rank of the group computes the same loss
  on the same whole-row log-probs, so its gradient for its own slice is the exact one: the sum of the ranks' parameter
  gradients is the gradient of one process on the whole row. DeepSpeed then averages over the whole world and the
  trainer's scale ``world_size * grad_accum`` (train/workers/policy_trainer.py) undoes that mean, as without SP;
  ZeRO partitions over the whole world (DeepSpeed's own SP setting also reduces and shards over the
  sequence-data-parallel group, which here is the world). tests/train/test_sequence_parallel.py checks the step.

What of DeepSpeed's serves and what is ours:
- the attention all-to-all is DeepSpeed's ``UlyssesSPAttentionHF`` and the SP groups come from DeepSpeed's
  ``parallel_state_sp`` (consecutive ranks);
- ``UlyssesSPAttentionHF.register_with_transformers`` does not serve: it replaces the model's core attention
  function under its own key for every model of the process, and its wrapper DISCARDS the 4D attention mask (and
  rebuilds a flex BlockMask as plain causal), relying on position ids. Packed rows need the exact document /
  multi-turn mask of train/models/attention.py, so we register our own attention key whose function hands
  ``UlyssesSPAttentionHF`` the whole-row mask [rows, 1, S, S] (built once per forward from the span description;
  transformers passes a 4D mask to the attention function unchanged) and sets the core attention to sdpa;
- ``UlyssesSPDataLoaderAdapter`` does not serve: it gathers a different batch from each SP rank's own data loader
  and turns them into SP micro-batches, expects dict batches of input_ids/position_ids/labels and drops the mask.
  Our driver already hands the group identical ``PackedBatch``es, so the slicing here does its job
  (``shift_labels`` then slice) on the packed row and its span description.

Backends: sdpa only (the exact dense mask). flex would need the BlockMask over the whole row and has no backward on
CPU; flash varlen boundaries are not wired for SP. Attention-free models (Mamba-2) have no attention to split.
train/run/config_checks.py refuses those before any work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_pipelines.packing import PackedBatch
from train.models.attention import allowed
from train.models.document_attention import SDPA_IMPLEMENTATIONS

ATTENTION_KEY = "reasonpost_ulysses_sdpa"  # the transformers attention implementation an SP model runs under


def sp_size(trainer_cfg) -> int:
    """``trainer.sequence_parallel_size`` (1 when the key is absent)."""
    return int((trainer_cfg or {}).get("sequence_parallel_size", 1) or 1)


def data_parallel_size(world_size: int, sequence_parallel: int) -> int:
    """Data-parallel degree: the number of SP groups, each taking its own micro-batches."""
    if sequence_parallel < 1 or world_size % sequence_parallel:
        raise ValueError(f"trainer.world_size={world_size} is not divisible by trainer.sequence_parallel_size={sequence_parallel}")
    return world_size // sequence_parallel


class SequenceParallel:
    """This rank's place in its SP group and the Ulysses attention of a model (set on the model by ``enable``).

    ``attention`` is the transformers attention function registered under ``ATTENTION_KEY``: it runs DeepSpeed's
    ``UlyssesSPAttentionHF`` (one per micro-batch row count, as it fixes the batch size) over HF's sdpa attention.
    """

    def __init__(self, group, size: int, rank: int, config):
        self.group, self.size, self.rank = group, size, rank
        text = config.get_text_config()
        self.heads, self.kv_heads = text.num_attention_heads, text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.layers = text.num_hidden_layers
        self._ulysses: dict[int, object] = {}  # rows -> UlyssesSPAttentionHF

    def _attention_for(self, rows: int):
        if rows not in self._ulysses:
            from deepspeed.runtime.sequence_parallel.ulysses_sp import (
                UlyssesSPAttentionHF,
            )
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            ulysses = UlyssesSPAttentionHF(
                attn=sdpa_attention_forward, batch_size=rows, attn_head_count=self.heads, attn_head_size=self.head_dim,
                kv_head_count=self.kv_heads, num_hidden_layers=self.layers, process_group=self.group,
                seq_length_is_variable=True)
            ulysses.core_attn_implementation = "sdpa"  # not flex: DeepSpeed would rebuild the mask as plain causal
            self._ulysses[rows] = ulysses
        return self._ulysses[rows]

    def attention(self, module, query, key, value, attention_mask, *args, **kwargs):
        """q, k, v [rows, heads, L, head_dim] of this rank's slice -> output [rows, L, heads * head_dim]; the mask is
        the whole row's [rows, 1, S, S] (``inputs``)."""
        return self._attention_for(query.shape[0])(module, query, key, value, attention_mask, *args, **kwargs)

    # -- the slice of a packed row --------------------------------------------------------------------------------
    def padded_length(self, seq: int) -> int:
        return -(-seq // self.size) * self.size

    def bounds(self, seq: int) -> tuple[int, int]:
        """[lo, hi) of this rank's slice of a row of ``seq`` tokens padded to a multiple of SP."""
        local = self.padded_length(seq) // self.size
        return self.rank * local, (self.rank + 1) * local

    def inputs(self, batch: PackedBatch) -> tuple[dict, torch.Tensor]:
        """(model keyword arguments for this rank's slice, the targets [rows, L] its positions predict). The targets
        are ``input_ids`` shifted by one over the WHOLE row, then sliced; pads (ids 0, position 0) see only themselves
        and predict id 0, and their log-probs are dropped after the gather."""
        seq = batch.input_ids.shape[1]
        pad = self.padded_length(seq) - seq
        lo, hi = self.bounds(seq)
        mask = allowed(batch.segment_ids, batch.visibility)  # [rows, seq, seq], the exact packed / multi-turn mask
        if pad:
            mask = F.pad(mask, (0, pad, 0, pad), value=False)
            mask[:, torch.arange(seq, seq + pad), torch.arange(seq, seq + pad)] = True  # pads see only themselves
        ids = F.pad(batch.input_ids, (0, pad), value=0)
        positions = F.pad(batch.position_ids, (0, pad), value=0)
        targets = F.pad(batch.input_ids[:, 1:], (0, pad + 1), value=0)  # [rows, S]: position t predicts t + 1
        inputs = {"input_ids": ids[:, lo:hi], "position_ids": positions[:, lo:hi], "attention_mask": mask[:, None]}
        return inputs, targets[:, lo:hi]

    def gather(self, local: torch.Tensor, seq: int) -> torch.Tensor:
        """This rank's per-position values [rows, L] -> the whole row's [rows, seq - 1] (differentiable)."""
        return _GatherSequence.apply(local, self, seq - 1)


class _GatherSequence(torch.autograd.Function):
    """All-gather of [rows, L] slices along the sequence into [rows, SP * L], cropped to the row's ``width``
    positions (a tensor of its own, not a view: the RL loss detaches an unused entropy in place). Backward: this
    rank's slice of the gradient only (not a reduce-scatter), because every rank of the group computes the same loss
    on the gathered tensor: the gradient it holds for its slice is already the whole gradient there."""

    @staticmethod
    def forward(ctx, local, sp, width):
        ctx.sp, ctx.local = sp, local.shape[1]
        parts = [torch.empty_like(local) for _ in range(sp.size)]
        torch.distributed.all_gather(parts, local.contiguous(), group=sp.group)
        return torch.cat(parts, dim=1)[:, :width].clone()

    @staticmethod
    def backward(ctx, grad):
        full = F.pad(grad, (0, ctx.sp.size * ctx.local - grad.shape[1]))  # the cropped pads get no gradient
        lo = ctx.sp.rank * ctx.local
        return full[:, lo:lo + ctx.local].contiguous(), None, None


def enable(model, size: int):
    """Form the SP groups (every rank calls this, after torch.distributed is initialised) and switch ``model``'s
    attention to Ulysses. Returns the ``SequenceParallel`` kept on ``model.sequence_parallel``; None for SP 1."""
    if size == 1:
        return None
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as groups
    from transformers import AttentionInterface

    from train.models.model_zoo import ATTENTION_FREE

    config = model.config  # a peft wrapper (model.lora) forwards to the transformers model's config
    if config.model_type in ATTENTION_FREE:
        raise ValueError(f"trainer.sequence_parallel_size={size}: {config.model_type} has no attention to split over "
                         "ranks; set trainer.sequence_parallel_size=1")
    groups.initialize_sequence_parallel(size)  # consecutive ranks; DeepSpeed's (Megatron-style) group state
    group = groups.get_sequence_parallel_group()
    sp = SequenceParallel(group, size, torch.distributed.get_rank(group), config)
    AttentionInterface.register(ATTENTION_KEY, sp.attention)
    config._attn_implementation = ATTENTION_KEY
    for module in model.modules():  # sub-configs (text config of a multimodal model) keep their own copy
        sub = getattr(module, "config", None)
        if sub is not None and sub is not config and getattr(sub, "_attn_implementation", None) in SDPA_IMPLEMENTATIONS:
            sub._attn_implementation = ATTENTION_KEY
    model.sequence_parallel = sp
    return sp


def of(model) -> SequenceParallel | None:
    """The ``SequenceParallel`` of ``model`` (or of the module a DeepSpeed engine / peft wrapper holds)."""
    attributes = getattr(model, "__dict__", {})  # not getattr(model, ...): torch modules resolve submodules there
    sp = attributes.get("sequence_parallel")
    if sp is None and isinstance(attributes.get("_modules"), dict) and "module" in attributes["_modules"]:
        sp = attributes["_modules"]["module"].__dict__.get("sequence_parallel")  # a DeepSpeed engine
    return sp
