"""Load chat rows from local jsonl / parquet files or `datasets` save_to_disk directories, in one of the common
data set shapes (``data.format`` + ``data.columns``: data_pipelines/dataset_shapes.py), or from the synthetic
generator; validate them (every bad row reported with its file and line), optionally drop training rows that
overlap the evaluation prompts, and tokenize them into packable documents."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from data_pipelines.arithmetic import ArithmeticSpec, generate
from data_pipelines.chat_format import split_reasoning
from data_pipelines.dataset_shapes import (
    ShapeError,
    columns_for,
    last_boxed,
    to_chat_row,
)
from data_pipelines.decontamination import contaminated
from data_pipelines.multiturn import chat_documents
from data_pipelines.validation import (
    DataValidationError,
    report,
    row_problems,
    validate_rows,
)

log = logging.getLogger(__name__)

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def final_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (braces matched to any depth), or None."""
    return last_boxed(text)


def check_files(files, key: str) -> list[Path]:
    """Paths of ``files`` (config key ``key``): jsonl / json / parquet files or ``datasets`` ``save_to_disk``
    directories; a missing path, an unknown extension or a DatasetDict root is an error now."""
    paths = []
    for f in files or []:
        path = Path(f).expanduser()
        if path.is_dir():
            if (path / "dataset_dict.json").is_file():
                splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
                raise DataValidationError(f"{key}: {str(path)!r} is a saved DatasetDict with splits {splits}; name one "
                                          f"split's directory, e.g. {str(path / (splits[0] if splits else 'train'))!r}")
            if not (path / "state.json").is_file():
                raise DataValidationError(f"{key}: directory {str(path)!r} is not a `datasets` save_to_disk directory "
                                          "(no state.json); give a jsonl/parquet file or a saved Dataset directory")
        elif not path.exists():
            raise FileNotFoundError(f"{key}: data file {str(path)!r} does not exist; fix the path in {key}")
        elif path.suffix not in _FORMATS:
            raise DataValidationError(f"{key}: {f!r} has extension {path.suffix!r}; use one of {sorted(_FORMATS)} or a "
                                      "`datasets` save_to_disk directory")
        paths.append(path)
    return paths


def check_jsonl_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of every non-blank line of a jsonl file; a line that is not one JSON object is an error
    naming file, line and reason (HF datasets would fail with a DatasetGenerationError that names neither)."""
    records = []
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
            records.append((number, value))
    return records


def read_records(path: Path) -> list[tuple[str, dict]]:
    """(location, record) per row of one file: ``file:line`` for jsonl, ``file: row i`` (0-based) otherwise.
    jsonl is read line by line (exact line numbers, no schema unification); json and parquet with HF datasets,
    directories with ``datasets.load_from_disk`` (local files only: no hub access)."""
    if path.suffix == ".jsonl" and not path.is_dir():
        return [(f"{path}:{number}", record) for number, record in check_jsonl_lines(path)]
    import datasets

    if path.is_dir():
        dataset = datasets.load_from_disk(str(path))
    else:
        dataset = datasets.load_dataset(_FORMATS[path.suffix], data_files=str(path), split="train")
    return [(f"{path}: row {i}", record) for i, record in enumerate(dataset.to_list())]


def with_reference_answer(row: dict) -> dict:
    """Fill ``answer`` from the last assistant message's boxed answer when the row has none."""
    if row.get("answer") is None:
        last = [m for m in row["messages"] if isinstance(m, dict) and m.get("role") == "assistant"]
        answer = final_boxed(split_reasoning(last[-1])[1]) if last else None
        row = {**row, "answer": answer}
    row["answer"] = None if row["answer"] is None else str(row["answer"])
    return row


def file_rows(path: Path, shape: str, columns: dict, require_assistant: bool, require_answer: bool) -> tuple[list[dict], list[str]]:
    """(chat rows, problems) of one file read as ``shape`` (data_pipelines/dataset_shapes.py), each problem
    ``location: field 'f': reason``; rows with problems are left out."""
    rows, problems = [], []
    for i, (location, record) in enumerate(read_records(path)):
        try:
            row = to_chat_row(record, shape, columns)
        except ShapeError as err:
            problems.append(f"{location}: field '{err.field}': {err.reason}")
            continue
        found = row_problems(row, require_assistant)
        if not found:
            row = with_reference_answer(row)
            if require_answer and row["answer"] is None:
                found = [("answer", ("no reference answer: add an answer column (data.columns.answer) or a final "
                                     "\\boxed{} in the last assistant message"))]
        if found:
            problems.extend(f"{location}: field '{field}': {reason}" for field, reason in found)
            continue
        rows.append({**row, "id": str(row.get("id", f"{path.stem}-{i}"))})
    return rows, problems


def prompt_text(row: dict) -> str:
    """The user turns of a chat row: what decontamination compares."""
    return "\n".join(m["content"] for m in row["messages"] if m.get("role") == "user")


def decontaminate(rows: list[dict], data_cfg, eval_rows: list[dict]) -> tuple[list[dict], int]:
    """(rows kept, number dropped): training rows whose prompt overlaps an evaluation prompt by word n-grams
    (``data.decontaminate``: ngram, threshold, files; data_pipelines/decontamination.py)."""
    dc = data_cfg.get("decontaminate") or {}
    n, threshold = int(dc.get("ngram") or 0), float(dc.get("threshold") or 0.0)
    if n < 0 or not 0.0 <= threshold <= 1.0:
        raise DataValidationError(f"data.decontaminate: ngram={n} must be >= 0 (0 = off) and threshold={threshold} in [0, 1]")
    if n == 0:
        return rows, 0
    reference = list(eval_rows)
    for path in check_files(dc.get("files"), "data.decontaminate.files"):
        more, problems = file_rows(path, data_cfg.get("format") or "chat",
                                   columns_for(data_cfg.get("format") or "chat", data_cfg.get("columns")), False, False)
        report(problems)
        reference.extend(more)
    if not reference:
        raise DataValidationError("data.decontaminate.ngram is set but there is no evaluation set to compare with: set "
                                  "data.eval_files or data.decontaminate.files (or data.decontaminate.ngram=0)")
    flags = contaminated([prompt_text(r) for r in rows], [prompt_text(r) for r in reference], n, threshold)
    kept = [row for row, flag in zip(rows, flags) if not flag]
    dropped = len(rows) - len(kept)
    log.warning("decontamination: dropped %d of %d training rows whose prompt shares a %d-gram with %d evaluation "
                "prompts (threshold %g)", dropped, len(rows), n, len(reference), threshold)
    if not kept:
        raise DataValidationError(f"data.decontaminate dropped all {len(rows)} training rows: raise "
                                  "data.decontaminate.ngram or data.decontaminate.threshold")
    return kept, dropped


def load_split(data_cfg, split: str, require_assistant: bool | None = None, stats: dict | None = None) -> list[dict]:
    """Rows of ``split`` ("train" or "eval") as configured in ``data_cfg``, validated (all bad rows reported at
    once, before any training). ``require_assistant`` defaults to True for train (SFT) and False for eval rows,
    which need a reference answer instead. ``stats`` (if given) receives ``data/decontaminated_rows``."""
    require_assistant = split == "train" if require_assistant is None else require_assistant
    if data_cfg.source == "synthetic":
        spec_cfg = dict(data_cfg.synthetic[split])
        num_samples, seed = spec_cfg.pop("num_samples"), spec_cfg.pop("seed")
        spec_cfg["ops"] = tuple(spec_cfg.get("ops", ("+", "-")))
        rows = generate(ArithmeticSpec(**spec_cfg), num_samples, seed, prefix=split)
        validate_rows(rows, f"synthetic {split}", require_assistant)
    elif data_cfg.source == "files":
        shape = data_cfg.get("format") or "chat"
        try:
            columns = columns_for(shape, data_cfg.get("columns"))
        except ValueError as err:
            raise DataValidationError(str(err)) from None
        rows, problems = [], []
        for path in check_files(data_cfg[f"{split}_files"], f"data.{split}_files"):
            more, bad = file_rows(path, shape, columns, require_assistant, require_answer=split == "eval")
            rows.extend(more)
            problems.extend(bad)
        report(problems)
    else:
        raise DataValidationError(f"data.source={data_cfg.source!r} must be 'synthetic' or 'files'")
    if split == "train" and (data_cfg.get("decontaminate") or {}).get("ngram"):
        has_eval = data_cfg.source == "synthetic" or data_cfg.get("eval_files")
        rows, dropped = decontaminate(rows, data_cfg, load_split(data_cfg, "eval") if has_eval else [])
        if stats is not None:
            stats["data/decontaminated_rows"] = dropped
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
