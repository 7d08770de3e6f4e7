"""Packing documents into token-budget rows, and the span description that every attention backend reads.

A ``Document`` is one training sequence (a chat, or one single-pass multi-turn chat). Inside it, tokens belong
to *segments*; ``visibility[a][b]`` says whether a token of segment ``a`` may attend to an (earlier or equal)
token of segment ``b``. For ordinary packing a document is one segment that sees itself; the multi-turn builder
makes several segments per chat. A packed row concatenates documents; its segment table is block diagonal over
documents (attention never crosses documents), and the tail padding is one more segment that sees only itself
(so no softmax row is empty). The mask of every backend is then::

    allowed(q, k) = k <= q  and  visibility[segment[q], segment[k]]

This (``segment_ids`` per token + ``visibility`` per row) is the single source of truth for the dense SDPA
mask, the FlexAttention BlockMask and the flash-attn varlen boundaries (see train/models/attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from algorithms import group_filters

IGNORE_INDEX = -100


@dataclass
class Document:
    input_ids: list[int]
    loss_mask: list[bool]  # True where the token is trained on (assistant tokens)
    position_ids: list[int] | None = None  # default 0..n-1
    segment_ids: list[int] | None = None  # local segment index per token, default all 0
    visibility: list[list[bool]] | None = None  # [num_segments, num_segments], default [[True]]
    sample_id: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.input_ids)
        if len(self.loss_mask) != n:
            raise ValueError(f"document {self.sample_id!r}: loss_mask has {len(self.loss_mask)} entries for {n} tokens")
        if self.position_ids is None:
            self.position_ids = list(range(n))
        if self.segment_ids is None:
            self.segment_ids = [0] * n
        if self.visibility is None:
            self.visibility = [[True]]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_segments(self) -> int:
        return len(self.visibility)


@dataclass
class PackedBatch:
    """Rows of packed documents. Labels follow the Hugging Face convention (not shifted)."""

    input_ids: torch.Tensor  # [rows, seq]
    labels: torch.Tensor  # [rows, seq], IGNORE_INDEX where no loss
    position_ids: torch.Tensor  # [rows, seq], restarting per document (per-turn view for multi-turn)
    segment_ids: torch.Tensor  # [rows, seq], row-global segment index
    visibility: torch.Tensor  # [rows, segments, segments] bool
    doc_ids: torch.Tensor  # [rows, seq], index into ``sample_ids``, -1 on padding
    sample_ids: list[str]
    plain: bool  # every document is a single self-visible segment (flash-attn varlen can run it)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_padding(self) -> int:
        return int((self.doc_ids < 0).sum())

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device) -> "PackedBatch":
        tensors = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return PackedBatch(**{**vars(self), **tensors})


def response_loss_masks(lengths: list[int], truncated: list[bool], mask_truncated: bool = False) -> list[list[bool]]:
    """Loss flags of the tokens of responses of ``lengths`` tokens: all True, except that with ``mask_truncated`` a
    response cut by the budget gets none (DAPO overlong filtering, algorithms.group_filters.mask_truncated)."""
    width = max(lengths, default=0)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]  # [responses, width]
    if mask_truncated:
        mask = group_filters.mask_truncated(mask, torch.tensor(truncated, dtype=torch.bool))
    return [row[:n].tolist() for row, n in zip(mask, lengths)]


def balanced_bins(sizes: list[int], num_bins: int) -> list[list[int]]:
    """Indices of ``sizes`` split into ``num_bins`` bins of near-equal totals: largest first, each into the
    lightest bin (the lower index on ties; Graham's LPT rule, within 4/3 of the best largest bin). Each bin's
    indices in input order; a bin stays empty when there are fewer sizes than bins (callers check)."""
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    loads = [0] * num_bins
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        b = min(range(num_bins), key=lambda b: (loads[b], b))
        bins[b].append(i)
        loads[b] += sizes[i]
    return [sorted(members) for members in bins]


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """First-fit decreasing bin packing of document lengths into rows of at most ``row_tokens`` tokens.

    Deterministic for given lengths; a longer document than the budget is an error (filter before packing).
    Rows keep their documents in input order so the data order stays visible in the rows.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        if lengths[i] > row_tokens:
            raise ValueError(f"document {i} has {lengths[i]} tokens > row budget {row_tokens}; filter it first")
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_tokens - lengths[i])
    return [sorted(row) for row in rows]


def collate(documents: list[list[Document]], pad_token_id: int, pad_to: int | None = None) -> PackedBatch:
    """Concatenate each row's documents and pad all rows to the longest one (or ``pad_to``)."""
    seq_len = max(sum(len(d) for d in row) for row in documents)
    seq_len = max(seq_len, pad_to or 0)
    num_segments = max(sum(d.num_segments for d in row) for row in documents) + 1  # +1: padding segment
    rows = len(documents)
    input_ids = torch.full((rows, seq_len), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, seq_len), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((rows, seq_len), dtype=torch.long)
    segment_ids = torch.zeros((rows, seq_len), dtype=torch.long)
    visibility = torch.zeros((rows, num_segments, num_segments), dtype=torch.bool)
    doc_ids = torch.full((rows, seq_len), -1, dtype=torch.long)
    sample_ids, plain = [], True
    for r, row in enumerate(documents):
        start, seg_offset = 0, 0
        for doc in row:
            n, s = len(doc), doc.num_segments
            end = start + n
            ids = torch.tensor(doc.input_ids)
            input_ids[r, start:end] = ids
            labels[r, start:end] = torch.where(torch.tensor(doc.loss_mask, dtype=torch.bool), ids, IGNORE_INDEX)
            position_ids[r, start:end] = torch.tensor(doc.position_ids)
            segment_ids[r, start:end] = torch.tensor(doc.segment_ids) + seg_offset
            visibility[r, seg_offset : seg_offset + s, seg_offset : seg_offset + s] = torch.tensor(doc.visibility)
            doc_ids[r, start:end] = len(sample_ids)
            sample_ids.append(doc.sample_id)
            plain &= s == 1
            start, seg_offset = end, seg_offset + s
        # tail padding: its own segment (flash-attn varlen runs it as one more sequence), positions 0.. like a document
        segment_ids[r, start:] = seg_offset
        visibility[r, seg_offset, seg_offset] = True
        position_ids[r, start:] = torch.arange(seq_len - start)
    return PackedBatch(input_ids, labels, position_ids, segment_ids, visibility, doc_ids, sample_ids, plain)


def pack(documents: list[Document], row_tokens: int, rows_per_batch: int, pad_token_id: int) -> list[PackedBatch]:
    """Pack ``documents`` into rows of ``row_tokens`` and group ``rows_per_batch`` rows into each batch."""
    rows = pack_rows([len(d) for d in documents], row_tokens)
    batches = []
    for i in range(0, len(rows), rows_per_batch):
        group = rows[i : i + rows_per_batch]
        batches.append(collate([[documents[j] for j in row] for row in group], pad_token_id))
    return batches


def pack_balanced(documents: list[Document], num_batches: int, row_tokens: int, pad_token_id: int) -> tuple[list[PackedBatch], list[list[int]]]:
    """Split ``documents`` into exactly ``num_batches`` batches of near-equal token counts (longest-first
    greedy), each packed into rows of ``row_tokens``. Returns the batches and, for each, the indices of its
    documents in ``batch.sample_ids`` order. Used where the number of micro-batches is fixed (data-parallel
    ranks x gradient-accumulation steps)."""
    if len(documents) < num_batches:
        raise ValueError(f"{len(documents)} documents cannot fill {num_batches} micro-batches; lower the micro-batch count")
    batches, index = [], []
    for members in balanced_bins([len(d) for d in documents], num_batches):
        rows = pack_rows([len(documents[i]) for i in members], row_tokens)
        ordered = [members[j] for row in rows for j in row]
        batches.append(collate([[documents[members[j]] for j in row] for row in rows], pad_token_id))
        index.append(ordered)
    return batches, index


def one_document_per_row(batch: PackedBatch, pad_token_id: int) -> tuple[PackedBatch, torch.Tensor]:
    """The documents of packed ``batch`` laid out one per row, right-padded: the layout for models that cannot
    keep packed documents apart (Mamba-2 without its CUDA kernels, see train/models/forward.py).

    Returns the padded batch (same ``sample_ids`` order, ``doc_ids`` = row index on tokens, -1 on padding) and
    ``source`` [docs, width]: the flat index into ``batch``'s [rows * seq] of each token, -1 on padding, so
    per-token outputs can be put back in the packed layout.
    """
    if not batch.plain:
        raise ValueError("one_document_per_row needs plain documents (one self-visible segment each); single-pass "
                         "multi-turn rows carry a per-turn mask that a padded row cannot express")
    device = batch.input_ids.device
    flat_doc = batch.doc_ids.reshape(-1)  # [rows * seq]
    real = flat_doc >= 0
    doc = flat_doc[real]  # [n] row-major, so each document's tokens are contiguous and in order
    num_docs = len(batch.sample_ids)
    counts = torch.bincount(doc, minlength=num_docs)  # [docs]
    width = int(counts.max()) if num_docs else 0
    slot = torch.arange(len(doc), device=device) - (torch.cumsum(counts, 0) - counts)[doc]  # [n] index in its doc

    def relaid(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full((num_docs, width), fill, dtype=values.dtype, device=device)  # [docs, width]
        out[doc, slot] = values.reshape(-1)[real]
        return out

    source = relaid(torch.arange(flat_doc.numel(), device=device), -1)
    on_token = source >= 0  # [docs, width]
    padded = PackedBatch(
        input_ids=relaid(batch.input_ids, pad_token_id),
        labels=relaid(batch.labels, IGNORE_INDEX),
        position_ids=relaid(batch.position_ids, 0),
        segment_ids=(~on_token).long(),  # segment 0: the document, 1: tail padding
        visibility=torch.eye(2, dtype=torch.bool, device=device).expand(num_docs, 2, 2).clone(),
        doc_ids=torch.where(on_token, torch.arange(num_docs, device=device)[:, None], -1),
        sample_ids=list(batch.sample_ids),
        plain=True,
    )
    return padded, source
