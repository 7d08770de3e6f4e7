"""Attention backends for packed rows, all derived from one span description (data_pipelines/packing.py).

- ``sdpa``: plain rows (every document one self-visible segment) of a model loaded by ``load_model`` (attention
  implementation ``PER_DOCUMENT_SDPA``) get the document boundaries (``varlen_boundaries``) and attention runs per
  document (train/models/document_attention.py: SDPA over width buckets of documents, so a packed token costs
  what a padded token costs). Other rows (single-pass multi-turn), and models under transformers' own ``sdpa``,
  get an explicit dense boolean mask [rows, 1, seq, seq] as a 4D mask, which transformers passes unchanged to
  ``scaled_dot_product_attention``. Both exact; the CPU path.
- ``flex``: a FlexAttention ``BlockMask`` built from the same segment table (skips fully masked blocks; the
  intended GPU path for arbitrary structure such as the multi-turn mask). torch 2.13 has no FlexAttention
  backward on CPU, so on CPU it is for forward passes only.
- ``flash``: flash-attn varlen, for plain packing only (every document one self-visible segment). The rows are
  flattened into one sequence of segments and the boundaries are handed to the kernel explicitly
  (``cu_seq_lens_q/k``, ``max_length_q/k``: transformers' ``FlashAttentionKwargs``, the keys TRL's padding-free
  collator passes). Without them transformers infers boundaries from restarting ``position_ids`` only for a batch of
  one row; with more rows it would run plain causal attention over each whole row, mixing documents. GPU only.
"""

from __future__ import annotations

import importlib.util

import torch

from data_pipelines.packing import PackedBatch
from train.models.document_attention import PER_DOCUMENT_SDPA

BACKENDS = ("sdpa", "flex", "flash")


def check_backend(backend: str, device: torch.device | str) -> None:
    """Raise before any work if ``backend`` cannot run on ``device``."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"model.attn_backend={backend!r} is not one of {list(BACKENDS)}")
    if backend == "flash":
        if device.type != "cuda":
            raise ValueError(
                "model.attn_backend=flash needs a CUDA GPU (flash-attn kernels); on this machine use "
                "model.attn_backend=sdpa (exact, CPU) or flex"
            )
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("model.attn_backend=flash needs the flash-attn package: pip install '.[gpu]'")


def allowed(segment_ids: torch.Tensor, visibility: torch.Tensor) -> torch.Tensor:
    """Dense mask [rows, seq, seq]: allowed(q, k) = k <= q and visibility[segment[q], segment[k]]."""
    rows, seq = segment_ids.shape
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    batch_index = torch.arange(rows, device=segment_ids.device)[:, None, None]
    visible = visibility[batch_index, segment_ids[:, :, None], segment_ids[:, None, :]]  # [rows, seq, seq]
    return visible & causal


def block_mask(segment_ids: torch.Tensor, visibility: torch.Tensor, block_size: int = 128):
    """FlexAttention BlockMask of the same rule as ``allowed``."""
    from torch.nn.attention.flex_attention import create_block_mask

    if segment_ids.device.type == "cpu":
        # torch 2.13's CPU flex kernel fails to recompile with dynamic shapes when the sequence length changes
        # between calls (CppCompileError 'cur_kvSplitSize'); compile each shape statically instead.
        torch._dynamo.config.automatic_dynamic_shapes = False

    def mask_mod(b, h, q, k):
        return (k <= q) & visibility[b, segment_ids[b, q], segment_ids[b, k]]

    rows, seq = segment_ids.shape
    return create_block_mask(
        mask_mod, rows, None, seq, seq, device=segment_ids.device, BLOCK_SIZE=min(block_size, seq)
    )


def varlen_boundaries(segment_ids: torch.Tensor) -> dict:
    """flash-attn varlen boundaries of plain packed rows ``segment_ids`` [rows, seq]: the rows flattened into one
    sequence of rows * seq tokens, a new segment wherever the segment id changes or a row starts. Every document
    is one segment and each row's tail padding is one more (it sees only itself, as in ``allowed``), so the
    segments cover every token, which transformers' varlen path needs (it reshapes [rows, seq] to [rows * seq])."""
    rows, seq = segment_ids.shape
    starts = torch.ones_like(segment_ids, dtype=torch.bool)  # [rows, seq] True where a segment begins
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = starts.reshape(-1).nonzero().squeeze(1)  # [segments] flat index of each segment's first token
    end = torch.tensor([rows * seq], device=segment_ids.device)
    cu_seq_lens = torch.cat([first, end]).to(torch.int32)  # [segments + 1]; the kernels take int32
    max_length = int(cu_seq_lens.diff().max())  # a Python int for the kernel's grid (one sync per forward)
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max_length, "max_length_k": max_length}


def model_inputs(batch: PackedBatch, backend: str, implementation: str | None = None) -> dict:
    """Keyword arguments for a Hugging Face causal LM forward on ``batch`` under ``backend``; ``implementation``: the
    model's ``config._attn_implementation`` (the per-document path needs ``PER_DOCUMENT_SDPA``, else a dense mask)."""
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
    if backend == "sdpa" and batch.plain and implementation == PER_DOCUMENT_SDPA:
        inputs.update(varlen_boundaries(batch.segment_ids))
    elif backend == "sdpa":
        inputs["attention_mask"] = allowed(batch.segment_ids, batch.visibility)[:, None]
    elif backend == "flex":
        inputs["attention_mask"] = block_mask(batch.segment_ids, batch.visibility)
    elif backend == "flash":
        if not batch.plain:
            raise ValueError(
                "model.attn_backend=flash runs plain packed documents only; rows with a multi-segment mask "
                "(single-pass multi-turn) need model.attn_backend=flex (GPU) or sdpa"
            )
        inputs.update(varlen_boundaries(batch.segment_ids))
    else:
        raise ValueError(f"model.attn_backend={backend!r} is not one of {list(BACKENDS)}")
    return inputs
