"""Stage 5, filtering: keep problems whose measured pass rate lies in a band, as training-ready chat rows.

A kept row is in the framework's ``messages`` format (data=files reads it): the problem as the user turn and,
when there is one, a worked solution as the assistant turn: the generator's reference reasoning (arithmetic
template) or else the first correct solver response (rejection sampling). A problem no sample solved and with
no reference solution becomes a prompt-only row (usable for RL, not SFT). ``difficulty`` carries the measured
``pass_rate`` and ``label`` (and the generator's ground truth when it has one) for curricula and samplers.
"""

from __future__ import annotations

from data_pipelines.validation import validate_rows


def check_band(band) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in band)
    except (TypeError, ValueError):
        raise ValueError(f"filter.band must be [low, high] pass rates, got {band!r}") from None
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"filter.band=[{low}, {high}] needs 0 <= low <= high <= 1 (pass rates); swap or fix the bounds")
    return low, high


def keep(row: dict, band: tuple[float, float], labels) -> bool:
    return band[0] <= row["pass_rate"] <= band[1] and (not labels or row["label"] in labels)


def training_row(row: dict) -> dict:
    messages = [{"role": "user", "content": row["question"]}]
    if row.get("reasoning"):
        messages.append({"role": "assistant", "reasoning_content": row["reasoning"],
                         "content": f"The answer is \\boxed{{{row['answer']}}}."})
    elif row.get("correct_response"):
        messages.append({"role": "assistant", "content": row["correct_response"]})
    difficulty = {"pass_rate": row["pass_rate"], "label": row["label"], **(row.get("ground_truth") or {})}
    out = {
        "id": row["id"], "messages": messages, "answer": row["answer"], "difficulty": difficulty,
        "stage": "filter", "source_id": row["id"], "seed": row["seed"], "concept_ids": row["concept_ids"],
        "generator": row["generator"], "solver": row["solver"], "rationale": row.get("rationale"),
    }
    validate_rows([out], f"filter stage row {row['id']!r}", require_assistant=False)
    return out


def select_by_difficulty(rows: list[dict], labels=None, pass_rate=None, source: str = "rows") -> list[dict]:
    """The rows of ``rows`` (filter-stage output) whose ``difficulty.label`` is in ``labels`` (None: any) and whose
    ``difficulty.pass_rate`` lies in ``pass_rate`` = [low, high] (inclusive; None: any). A curriculum phase picks
    its problems by measured difficulty this way. A row without these labels is an error naming ``source``."""
    band = check_band(pass_rate) if pass_rate is not None else None
    wanted = set(labels) if labels else None
    selected = []
    for row in rows:
        difficulty = row.get("difficulty") or {}
        if "label" not in difficulty or "pass_rate" not in difficulty:
            raise ValueError(f"{source}: row {row.get('id')!r} has no difficulty.label / difficulty.pass_rate; select "
                             "by difficulty only on `python -m train.synthesis` output (<out>/filtered.jsonl)")
        if (wanted is None or difficulty["label"] in wanted) and (band is None or band[0] <= difficulty["pass_rate"] <= band[1]):
            selected.append(row)
    return selected
