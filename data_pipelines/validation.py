"""Row validation for chat data in the `messages` format, run before any training work.

A row is ``{"messages": [{"role": "system"|"user"|"assistant", "content": str, "reasoning_content"?: str}, ...],
"answer"?: str, ...}`` (other data set shapes are mapped onto it first: data_pipelines/dataset_shapes.py).
Problems are reported with the source file and line (jsonl) or row number (0-based: parquet, directories,
generated rows), the field and the fix.
"""

from __future__ import annotations

from data_pipelines.chat_format import split_reasoning

ROLES = ("system", "user", "assistant")


class DataValidationError(ValueError):
    pass


def row_problems(row, require_assistant: bool = True) -> list[tuple[str, str]]:
    """(field, reason) for everything wrong with one row; empty if the row is valid."""
    if not isinstance(row, dict):
        return [("<row>", f"expected an object with a 'messages' list, got {type(row).__name__}")]
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return [("messages", "missing or empty: each row needs a non-empty list of {role, content} messages")]
    problems = []
    seen_user = False
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            problems.append((field, "each message must be an object with 'role' and 'content'"))
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            problems.append((f"{field}.role", f"{role!r} is not one of {list(ROLES)}"))
            continue
        if not isinstance(content, str):
            problems.append((f"{field}.content", "must be a string"))
            continue
        reasoning = message.get("reasoning_content")
        if reasoning is not None and role != "assistant":
            problems.append((f"{field}.reasoning_content", f"reasoning on a {role} message: only assistant messages reason"))
        if reasoning is not None and not isinstance(reasoning, str):
            problems.append((f"{field}.reasoning_content", "must be a string"))
        if role == "system" and i != 0:
            problems.append((f"{field}.role", "a system message may only come first"))
        if role == "user":
            seen_user = True
        if role == "assistant":
            if not seen_user:
                problems.append((f"{field}.role", "assistant message without a user message before it"))
            _, answer = split_reasoning(message)
            if not answer:
                problems.append((f"{field}.content", "empty answer: the assistant message needs content after its reasoning"))
    if require_assistant and not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        problems.append(("messages", "no assistant message: SFT rows need at least one assistant turn to train on"))
    if row.get("answer") is not None and not isinstance(row["answer"], (str, int, float)):
        problems.append(("answer", "must be a string or a number"))
    return problems


def validate_rows(rows: list, source: str, require_assistant: bool = True, max_report: int = 10) -> None:
    """Raise DataValidationError listing the first ``max_report`` bad rows of ``source``."""
    bad = []
    for index, row in enumerate(rows):
        for field, reason in row_problems(row, require_assistant):
            bad.append(f"{source}: row {index}: field '{field}': {reason}")
    report(bad, max_report)


def report(bad: list[str], max_report: int = 10) -> None:
    """Raise DataValidationError listing the first ``max_report`` of the problems ``bad`` (and how many more)."""
    if bad:
        shown = "\n  ".join(bad[:max_report])
        more = f"\n  ... and {len(bad) - max_report} more" if len(bad) > max_report else ""
        raise DataValidationError(
            f"{len(bad)} problem(s) in the data; fix these rows or remove them:\n  {shown}{more}"
        )
