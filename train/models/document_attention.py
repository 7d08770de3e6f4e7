"""Attention per document inside plain packed rows, with torch SDPA: the default ``sdpa`` path for plain rows.

A dense [rows, 1, seq, seq] mask keeps packed documents apart but still has SDPA compute every query-key pair of
the whole row: a 512-token row of five 100-token chats costs 512^2 pairs where 5 * 100^2 would do. Here each
document (and each row's tail padding, which sees only itself, as in the dense mask) is one causal segment, given
by the flash-attn varlen boundaries ``cu_seq_lens_q`` that ``model_inputs`` passes (train/models/attention.py;
transformers forwards them to the attention function). The segments are grouped into width buckets (similar
lengths, right-padded to the bucket's longest), each bucket runs one causal ``scaled_dot_product_attention``, and
the outputs go back to their tokens:

    out[t] = softmax(q_t K_s^T * scale, over keys k <= t of t's segment s) V_s

Right padding inside a bucket is exact under a causal mask: a real query at offset j sees keys 0..j of its own
segment only, never the padded slots after the segment's end; the padded queries' outputs are dropped (so they get
no gradient). Attention work is then sum over buckets of segments x width^2 instead of rows x seq^2.

Every other call (no boundaries: generation, decode with a cache, a plain padded batch, non-plain rows under the
dense mask) is transformers' own ``sdpa_attention_forward`` unchanged. Sliding windows are not applied, as under
the dense mask (train/models/architectures.py refuses documents longer than the window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PER_DOCUMENT_SDPA = "reasonpost_document_sdpa"  # the transformers attention implementation ``sdpa`` loads models with
SDPA_IMPLEMENTATIONS = ("sdpa", PER_DOCUMENT_SDPA)  # both run sdpa_attention_forward on calls without boundaries
WIDTH_RATIO = 0.8  # a segment joins the open bucket while its length >= WIDTH_RATIO * the bucket's width
SMALL_WIDTH = 32  # below this width the rest of the segments share one bucket (a call costs more than the padding)


def width_buckets(lengths: list[int], ratio: float = WIDTH_RATIO, small: int = SMALL_WIDTH) -> list[list[int]]:
    """Segment indices grouped for padded batched attention: longest first, a new bucket when a segment is shorter
    than ``ratio`` x the open bucket's width (its first, longest segment), except that once the width is at most
    ``small`` every remaining segment joins it. Padding per segment of length L in a bucket of width w: w - L < (1 -
    ratio) w tokens, attention pairs w^2 / L^2 < 1 / ratio^2."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        width = lengths[buckets[-1][0]] if buckets else 0
        if buckets and (lengths[i] >= ratio * width or width <= small):
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


@dataclass
class SegmentPlan:
    """Where each bucket's rows come from and where the outputs go, for segments covering ``tokens`` flat tokens.

    gathers: per bucket, flat token indices [segments, width] (padded slots repeat the segment's last token);
    source: [tokens], the row of each token in the buckets' outputs concatenated ([sum segments x width])."""

    gathers: list[torch.Tensor]
    source: torch.Tensor
    tokens: int

    @classmethod
    def of(cls, cu_seq_lens: torch.Tensor) -> SegmentPlan:
        starts = cu_seq_lens.tolist()  # one host sync per forward (the plan is cached across layers)
        lengths = [b - a for a, b in zip(starts, starts[1:])]
        device = cu_seq_lens.device
        gathers, source, offset = [], torch.empty(starts[-1], dtype=torch.long, device=device), 0
        for bucket in width_buckets(lengths):
            width = lengths[bucket[0]]
            begin = torch.tensor([starts[i] for i in bucket], device=device)[:, None]  # [segments, 1]
            length = torch.tensor([lengths[i] for i in bucket], device=device)[:, None]
            step = torch.arange(width, device=device)[None]  # [1, width]
            gathers.append(begin + torch.minimum(step, length - 1))  # [segments, width]
            real = step < length  # [segments, width]
            slots = offset + torch.arange(len(bucket) * width, device=device).view(len(bucket), width)
            source[(begin + step)[real]] = slots[real]
            offset += len(bucket) * width
        return cls(gathers, source, starts[-1])


_cached: tuple[torch.Tensor, SegmentPlan] | None = None  # (the boundaries tensor of the last forward, its plan)


def segment_plan(cu_seq_lens: torch.Tensor) -> SegmentPlan:
    """The plan of ``cu_seq_lens``, built once per forward: every layer gets the same tensor object."""
    global _cached
    if _cached is None or _cached[0] is not cu_seq_lens:
        _cached = (cu_seq_lens, SegmentPlan.of(cu_seq_lens))
    return _cached[1]


def per_document_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """transformers attention function: q [rows, heads, seq, d], k/v [rows, kv_heads, seq, d] -> ([rows, seq, heads,
    d], None). With ``cu_seq_lens_q`` (segments of the rows flattened): causal attention inside each segment;
    without: ``sdpa_attention_forward``."""
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("sdpa attention cannot soft-cap attention logits; use model.attn_backend=flex")
    rows, heads, seq, dim = query.shape
    plan = segment_plan(cu_seq_lens)
    if key.shape[2] != seq or plan.tokens != rows * seq:
        raise ValueError(f"per-document attention needs segments covering the {rows} x {seq} query tokens and no "
                         f"cache, got {plan.tokens} segment tokens and {key.shape[2]} keys per row")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # [rows, heads, seq, d]
    flat_q, flat_k, flat_v = (t.transpose(1, 2).reshape(rows * seq, heads, t.shape[-1]) for t in (query, key, value))
    outputs = []
    for gather in plan.gathers:
        segments, width = gather.shape
        index = gather.reshape(-1)
        q, k, v = (t.index_select(0, index).view(segments, width, heads, -1).transpose(1, 2)
                   for t in (flat_q, flat_k, flat_v))  # [segments, heads, width, d]
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
        outputs.append(out.transpose(1, 2).reshape(segments * width, heads, -1))
    out = torch.cat(outputs).index_select(0, plan.source)  # [rows * seq, heads, d]
    return out.view(rows, seq, heads, -1), None


AttentionInterface.register(PER_DOCUMENT_SDPA, per_document_sdpa)
AttentionMaskInterface.register(PER_DOCUMENT_SDPA, sdpa_mask)  # masks for the calls without boundaries, as sdpa's
