"""Resumable stage output: one jsonl file per stage, appended a row at a time.

A stage writes each finished row as one line and flushes it, so a crash loses at most the row being written.
On restart the rows already in the file are read back, a torn last line (a crash mid-write) is cut off, and
the stage skips every input whose output id is already there: no duplicates, no gaps. Parquet, when asked
for, is written from the complete jsonl at the end of the stage.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def read_rows(path: Path) -> list[dict]:
    """Complete rows of a stage file (a torn last line is ignored)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                rows.append(json.loads(line))
    return rows


def require_stage_file(path: Path, stage: str, producer: str) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(
            f"stage '{stage}' reads {str(path)!r}, which does not exist; run stage '{producer}' first "
            f"(--stages {producer},{stage}) or point --out at the directory that holds it"
        )
    return read_rows(path)


class StageWriter:
    """Appends rows of one stage to ``path``; ``done`` holds the ids already written (from earlier runs too)."""

    def __init__(self, path: Path, stage: str):
        self.path, self.stage = Path(path), stage
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        self.written = 0
        if self.path.exists():
            self._recover()
        self._file = open(self.path, "a", encoding="utf-8")

    def _recover(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", self.path, len(data) - len(complete))
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        for number, line in enumerate(complete.decode("utf-8").splitlines()):
            try:
                self.done.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(
                    f"{self.path}: line {number + 1} is not a stage row with an 'id' ({err}); "
                    "delete the file to rerun this stage from scratch"
                ) from None
        if self.done:
            log.info("%s: resuming, %d rows already written", self.path, len(self.done))

    def todo(self, ids: list[str]) -> list[str]:
        return [i for i in ids if i not in self.done]

    def write(self, row: dict) -> None:
        if row["id"] in self.done:
            raise ValueError(f"{self.path}: row id {row['id']!r} written twice (stage '{self.stage}')")
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        self.done.add(row["id"])
        self.written += 1

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def write_parquet(jsonl_path: Path) -> Path:
    """``<stage>.parquet`` next to ``<stage>.jsonl``, from all its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(jsonl_path).with_suffix(".parquet")
    rows = read_rows(Path(jsonl_path))
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)
    return path
