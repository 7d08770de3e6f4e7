"""Load chat rows from local jsonl/parquet files (Hugging Face `datasets`) or from the synthetic generator,
validate them, and tokenize them into packable documents."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from data_pipelines.arithmetic import ArithmeticSpec, generate
from data_pipelines.chat_format import split_reasoning
from data_pipelines.multiturn import chat_documents
from data_pipelines.validation import DataValidationError, validate_rows

log = logging.getLogger(__name__)

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")


def final_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (one level of nested braces), or None."""
    found = _BOXED.findall(text or "")
    return found[-1].strip() if found else None


def check_files(files, key: str) -> list[Path]:
    """Paths of ``files`` (config key ``key``); a missing file or an unknown extension is an error now."""
    paths = []
    for f in files or []:
        path = Path(f).expanduser()
        if path.suffix not in _FORMATS:
            raise DataValidationError(f"{key}: {f!r} has extension {path.suffix!r}; use one of {sorted(_FORMATS)}")
        if not path.is_file():
            raise FileNotFoundError(f"{key}: data file {str(path)!r} does not exist; fix the path in {key}")
        paths.append(path)
    return paths


def check_jsonl_lines(path: Path) -> None:
    """Every non-blank line of a jsonl file is one JSON object; else an error naming file, line and reason (HF
    datasets would fail with a DatasetGenerationError that names neither)."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataValidationError(f"{path}:{number}: not JSON ({err.msg} at column {err.colno}); fix or remove "
                                          "the line (one JSON object per line)") from None
            if not isinstance(value, dict):
                raise DataValidationError(f"{path}:{number}: a JSON {type(value).__name__}, not an object; each line "
                                          "must be one row object such as {\"messages\": [...]}")


def load_files(paths: list[Path]) -> list[tuple[str, list[dict]]]:
    """(file name, rows) per file, read with HF datasets (no hub access: local files only)."""
    from datasets import load_dataset

    loaded = []
    for path in paths:
        if path.suffix == ".jsonl":
            check_jsonl_lines(path)
        dataset = load_dataset(_FORMATS[path.suffix], data_files=str(path), split="train")
        loaded.append((str(path), dataset.to_list()))
    return loaded


def with_reference_answer(row: dict) -> dict:
    """Fill ``answer`` from the last assistant message's boxed answer when the row has none."""
    if row.get("answer") is None:
        last = [m for m in row["messages"] if m.get("role") == "assistant"]
        answer = final_boxed(split_reasoning(last[-1])[1]) if last else None
        row = {**row, "answer": answer}
    row["answer"] = None if row["answer"] is None else str(row["answer"])
    return row


def load_split(data_cfg, split: str, require_assistant: bool = True) -> list[dict]:
    """Rows of ``split`` ("train" or "eval") as configured in ``data_cfg``, validated."""
    if data_cfg.source == "synthetic":
        spec_cfg = dict(data_cfg.synthetic[split])
        num_samples, seed = spec_cfg.pop("num_samples"), spec_cfg.pop("seed")
        spec_cfg["ops"] = tuple(spec_cfg.get("ops", ("+", "-")))
        rows = generate(ArithmeticSpec(**spec_cfg), num_samples, seed, prefix=split)
        validate_rows(rows, f"synthetic {split}", require_assistant)
        return rows
    if data_cfg.source != "files":
        raise DataValidationError(f"data.source={data_cfg.source!r} must be 'synthetic' or 'files'")
    rows = []
    for name, file_rows in load_files(check_files(data_cfg[f"{split}_files"], f"data.{split}_files")):
        validate_rows(file_rows, name, require_assistant)
        for i, row in enumerate(file_rows):
            rows.append({**with_reference_answer(row), "id": row.get("id", f"{Path(name).stem}-{i}")})
    return rows


def tokenize_rows(rows: list[dict], tokenizer, max_seq_len: int, system_prompt: str | None = None,
                  multi_turn: str = "single_pass"):
    """(documents, number of rows dropped because they exceed ``max_seq_len`` tokens).

    A chat becomes one document (``multi_turn=single_pass``: earlier answers duplicated, exact per-turn mask;
    see data_pipelines/multiturn.py) or one document per assistant turn (``per_turn``); a one-turn chat is the
    same ordinary document either way. A chat whose documents do not fit is dropped whole."""
    documents, dropped = [], 0
    for index, row in enumerate(rows):
        messages = row["messages"]
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        docs = chat_documents(tokenizer, messages, multi_turn, row["id"], chat_index=index)
        if max(len(d) for d in docs) > max_seq_len:
            dropped += 1
            continue
        documents.extend(docs)
    if dropped:
        log.warning(
            "dropped %d of %d rows longer than data.max_seq_len=%d tokens (%.1f%%); raise data.max_seq_len to keep them",
            dropped, len(rows), max_seq_len, 100.0 * dropped / max(len(rows), 1),
        )
    if not documents:
        raise DataValidationError(f"no training rows left after dropping {dropped} rows longer than data.max_seq_len={max_seq_len}")
    return documents, dropped
