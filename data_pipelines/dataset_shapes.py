"""The common math data set shapes, mapped onto our chat row format.

Every shape becomes ``{"messages": [...], "answer": str | None, <extra scalar columns>}``, the row SFT
(data_pipelines/loading.py ``tokenize_rows``) and RL (data_pipelines/prompts.py ``to_prompts``) already take:

- ``gsm8k``: ``question``, ``answer`` = worked solution ending in ``#### N`` -> user question, assistant reasoning
  (the text before ``####``; calculator annotations ``<<48/2=24>>`` removed) and ``\\boxed{N}``; answer N.
- ``math`` (MATH, MATH-500): ``problem``, ``solution`` with a final ``\\boxed{}`` and/or ``answer`` -> user
  problem, assistant reasoning (the solution) and ``\\boxed{answer}``; a row with an answer but no solution is
  prompt-only (RL / evaluation).
- ``chat`` (ours, OpenR1 / NuminaMath style): ``messages`` with the reasoning in ``reasoning_content`` or inside
  ``<think>...</think>`` in the content; optional ``answer`` (else the last assistant's ``\\boxed{}``).
- ``prompts`` (prompt-only RL sets): ``prompt`` (a string, or a list of messages) and ``answer``.

``columns`` maps each field the shape reads (the keys of ``DEFAULT_COLUMNS[shape]``) to the column holding it in
the file. Problems come back as (column, reason) pairs naming the mapping key to set, so the loader can report
them with the file and line.
"""

from __future__ import annotations

import re

SHAPES = ("chat", "gsm8k", "math", "prompts")
DEFAULT_COLUMNS = {
    "chat": {"messages": "messages", "answer": "answer"},
    "gsm8k": {"question": "question", "answer": "answer"},
    "math": {"problem": "problem", "solution": "solution", "answer": "answer"},
    "prompts": {"prompt": "prompt", "answer": "answer"},
}
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_KEPT_TYPES = (str, int, float, bool)


class ShapeError(ValueError):
    """A row that does not fit its shape: ``field`` is the shape's field (a ``data.columns`` key)."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def last_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces matched to any depth, or None."""
    text = text or ""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip()
        i += 1
    return None  # unbalanced braces


def gsm8k_final_answer(solution: str) -> tuple[str, str] | None:
    """(reasoning, final answer) of a GSM8K solution ``... #### N`` (commas in N removed), None without ``####``."""
    if "####" not in solution:
        return None
    reasoning, answer = solution.rsplit("####", 1)
    answer = answer.strip().replace(",", "")
    if not answer:
        return None
    return _CALCULATOR.sub("", reasoning).strip(), answer


def columns_for(shape: str, columns: dict | None) -> dict:
    """The shape's default column mapping updated by ``columns`` (unknown keys refused)."""
    if shape not in SHAPES:
        raise ValueError(f"data.format={shape!r} must be one of {list(SHAPES)}")
    merged = dict(DEFAULT_COLUMNS[shape])
    for key, value in (columns or {}).items():
        if key not in merged:
            raise ValueError(f"data.columns.{key}: format {shape!r} reads only {sorted(merged)}")
        if value is not None:
            merged[key] = str(value)
    return merged


def _get(record: dict, columns: dict, field: str, required: bool = True):
    column = columns[field]
    value = record.get(column)
    if value is None and required:
        present = sorted(k for k, v in record.items() if v is not None)
        raise ShapeError(field, f"missing column '{column}' (columns here: {present}); set data.columns.{field} to "
                                f"the column that holds the {field}")
    if value is not None and field != "messages" and not isinstance(value, (str, int, float)) and not (
            field == "prompt" and isinstance(value, list)):
        raise ShapeError(field, f"column '{column}' is a {type(value).__name__}, not text")
    return value


def _extra(record: dict, columns: dict) -> dict:
    """Scalar columns the shape does not read (source, level, difficulty, ...): kept for breakdowns and rewards."""
    used = set(columns.values())
    return {k: v for k, v in record.items() if k not in used and k != "messages" and isinstance(v, _KEPT_TYPES)}


def _answer_message(reasoning: str, answer: str) -> dict:
    return {"role": "assistant", "reasoning_content": reasoning, "content": f"The answer is \\boxed{{{answer}}}."}


def gsm8k_row(record: dict, columns: dict) -> dict:
    question, solution = str(_get(record, columns, "question")), str(_get(record, columns, "answer"))
    split = gsm8k_final_answer(solution)
    if split is None:
        raise ShapeError("answer", f"column '{columns['answer']}' does not end in '#### <final answer>' (GSM8K "
                                   "format); fix the row, or use data.format=prompts for plain answers")
    reasoning, answer = split
    messages = [{"role": "user", "content": question}]
    if reasoning:
        messages.append(_answer_message(reasoning, answer))
    return {**_extra(record, columns), "messages": messages, "answer": answer}


def math_row(record: dict, columns: dict) -> dict:
    problem = str(_get(record, columns, "problem"))
    solution = _get(record, columns, "solution", required=False)
    answer = _get(record, columns, "answer", required=False)
    if solution is None and answer is None:
        raise ShapeError("solution", f"neither column '{columns['solution']}' nor '{columns['answer']}' is present; set "
                                     "data.columns.solution or data.columns.answer")
    if answer is None:
        answer = last_boxed(str(solution))
        if answer is None:
            raise ShapeError("solution", f"column '{columns['solution']}' has no \\boxed{{}} final answer and the row has "
                                         f"no '{columns['answer']}' column; add one (data.columns.answer)")
    answer = str(answer).strip()
    messages = [{"role": "user", "content": problem}]
    if solution is not None and str(solution).strip():
        messages.append(_answer_message(str(solution).strip(), answer))
    return {**_extra(record, columns), "messages": messages, "answer": answer}


def chat_row(record: dict, columns: dict) -> dict:
    messages = _get(record, columns, "messages")
    if not isinstance(messages, list):
        raise ShapeError("messages", f"column '{columns['messages']}' is a {type(messages).__name__}, not a list of "
                                     "{role, content} messages")
    answer = _get(record, columns, "answer", required=False)
    kept = {k: v for k, v in record.items() if k not in (columns["messages"], columns["answer"])}  # all, as before
    return {**kept, "messages": messages, "answer": answer}


def prompt_row(record: dict, columns: dict) -> dict:
    prompt = _get(record, columns, "prompt")
    answer = _get(record, columns, "answer")
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    return {**_extra(record, columns), "messages": messages, "answer": str(answer).strip()}


BUILDERS = {"chat": chat_row, "gsm8k": gsm8k_row, "math": math_row, "prompts": prompt_row}


def to_chat_row(record, shape: str, columns: dict) -> dict:
    """One file record as a chat row; raises ShapeError(field, reason) when it does not fit ``shape``."""
    if not isinstance(record, dict):
        raise ShapeError("<row>", f"expected an object with columns, got {type(record).__name__}")
    return BUILDERS[shape](record, columns)
