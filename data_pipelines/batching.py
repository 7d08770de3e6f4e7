"""A deterministic, resumable stream of packed batches over epochs."""

from __future__ import annotations

import random

from data_pipelines.packing import Document, PackedBatch, collate, pack_rows


class PackedBatchStream:
    """Each epoch shuffles the documents (seeded by ``seed`` and the epoch), packs them into rows of
    ``row_tokens``, shuffles the rows and yields ``rows_per_batch`` rows at a time. The position
    (epoch, batch index) is the whole state, so resuming replays exactly the same batches."""

    def __init__(self, documents: list[Document], row_tokens: int, rows_per_batch: int, pad_token_id: int, seed: int):
        self.documents, self.row_tokens, self.rows_per_batch = documents, row_tokens, rows_per_batch
        self.pad_token_id, self.seed = pad_token_id, seed
        self.epoch, self.index = 0, 0
        self._rows: list[list[int]] | None = None

    def _epoch_rows(self) -> list[list[int]]:
        if self._rows is None:
            rng = random.Random(self.seed * 1_000_003 + self.epoch)
            order = list(range(len(self.documents)))
            rng.shuffle(order)
            rows = [[order[i] for i in row] for row in pack_rows([len(self.documents[i]) for i in order], self.row_tokens)]
            rng.shuffle(rows)
            self._rows = rows
        return self._rows

    def batches_per_epoch(self) -> int:
        return -(-len(self._epoch_rows()) // self.rows_per_batch)

    def next(self) -> PackedBatch:
        rows = self._epoch_rows()
        if self.index * self.rows_per_batch >= len(rows):
            self.epoch, self.index, self._rows = self.epoch + 1, 0, None
            rows = self._epoch_rows()
        group = rows[self.index * self.rows_per_batch : (self.index + 1) * self.rows_per_batch]
        self.index += 1
        return collate([[self.documents[i] for i in row] for row in group], self.pad_token_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._rows = state["epoch"], state["index"], None
