import json

import pytest
from omegaconf import OmegaConf

from data_pipelines.loading import load_split, tokenize_rows
from data_pipelines.validation import DataValidationError, row_problems

GOOD = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>one plus one</think> \\boxed{2}"}]}


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _files_cfg(train_files):
    return OmegaConf.create({"source": "files", "train_files": [str(f) for f in train_files], "eval_files": []})


@pytest.mark.parametrize(
    "row, field, reason",
    [
        ({"text": "hi"}, "messages", "missing or empty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "is not one of"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages[0].role", "without a user message"),
        ({"messages": [{"role": "user", "content": "q", "reasoning_content": "r"}, {"role": "assistant", "content": "a"}]},
         "messages[0].reasoning_content", "reasoning on a user message"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think>"}]},
         "messages[1].content", "empty answer"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "messages[0].content", "string"),
    ],
)
def test_row_problems_name_field_and_reason(row, field, reason):
    problems = row_problems(row)
    assert any(f == field and reason in r for f, r in problems), problems


def test_good_row_has_no_problem():
    assert row_problems(GOOD) == []


def test_bad_row_in_file_reports_file_and_row_number(tmp_path):
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}
    path = _write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataValidationError, match=r"train\.jsonl:3: field 'messages\[1\]\.content': empty answer"):
        load_split(_files_cfg([path]), "train")


@pytest.mark.parametrize("bad_line,reason", [
    ('{"messages": [}', r"train\.jsonl:3: not JSON \(Expecting value at column 15\)"),
    ("[1, 2]", r"train\.jsonl:3: a JSON list, not an object"),
])
def test_a_line_that_is_not_a_json_object_names_file_and_line(tmp_path, bad_line, reason):
    import json

    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), "", bad_line, json.dumps(GOOD)]) + "\n")
    with pytest.raises(DataValidationError, match=reason):
        load_split(_files_cfg([path]), "train")


def test_jsonl_and_parquet_load_with_reference_answers(tmp_path):
    import datasets

    rows = [GOOD, {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "\\boxed{4}", "reasoning_content": "two and two"}], "answer": 4}]
    # parquet needs one schema: give both rows the same fields
    table_rows = [{"messages": [dict(m, reasoning_content=m.get("reasoning_content")) for m in r["messages"]], "answer": str(r.get("answer", "2"))} for r in rows]
    datasets.Dataset.from_list(table_rows).to_parquet(str(tmp_path / "t.parquet"))
    loaded = load_split(_files_cfg([_write_jsonl(tmp_path / "t.jsonl", rows), tmp_path / "t.parquet"]), "train")
    assert [r["answer"] for r in loaded] == ["2", "4", "2", "4"]
    assert loaded[0]["id"] == "t-0"


def test_rows_dropped_for_length_are_counted(tiny_tokenizer, caplog):
    rows = [dict(GOOD, id="short"), {"id": "long", "messages": [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "\\boxed{1}"}]}]
    documents, dropped = tokenize_rows(rows, tiny_tokenizer, max_seq_len=128)
    assert dropped == 1 and [d.sample_id for d in documents] == ["short"]
    assert "dropped 1 of 2 rows longer than data.max_seq_len=128" in caplog.text
    with pytest.raises(DataValidationError, match="max_seq_len"):
        tokenize_rows(rows[1:], tiny_tokenizer, max_seq_len=128)
