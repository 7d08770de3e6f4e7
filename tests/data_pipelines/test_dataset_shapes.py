"""The common data set shapes from jsonl, parquet and save_to_disk directories: rows as SFT/RL take them, and every
bad row reported with its file, line and reason (naming the column and the data.columns key to set)."""

import json

import pytest
from omegaconf import OmegaConf

from data_pipelines.chat_format import generation_prompt
from data_pipelines.dataset_shapes import gsm8k_final_answer, last_boxed
from data_pipelines.loading import load_split
from data_pipelines.prompts import to_prompts
from data_pipelines.validation import DataValidationError

GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
               "in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much "
                 "did she earn?", "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 1,010"},
]
MATH = [
    {"problem": "What is $\\frac{\\sqrt{3}}{2}$ squared?", "solution": "It is $\\boxed{\\frac{3}{4}}$.", "level": "Level 2",
     "type": "Algebra"},
    {"problem": "Compute $1+1$.", "solution": "Clearly $\\boxed{2}$.", "answer": "2", "level": "Level 1", "type": "Prealgebra"},
    {"problem": "Find $x$ if $x+1=3$.", "answer": "2", "level": "Level 1", "type": "Algebra"},  # MATH-500 style, no solution
]
OPENR1 = [{"problem": "2+2?", "answer": "4", "source": "amc",
           "messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "<think>two and two</think> So \\boxed{4}."}]}]
PROMPTS = [{"prompt": "What is 6 times 7?", "answer": 42}, {"prompt": [{"role": "user", "content": "3-1?"}], "answer": "2"}]


def _jsonl(path, rows, blank_after_first=False):
    lines = [json.dumps(r) for r in rows]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _cfg(fmt, train=(), eval_=(), columns=None, **extra):
    return OmegaConf.create({"source": "files", "format": fmt, "columns": columns or {}, "train_files": list(train),
                             "eval_files": list(eval_), **extra})


def test_last_boxed_matches_nested_braces_and_gsm8k_answer_drops_commas():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{\\sqrt{3}}{2}} end") == "\\frac{\\sqrt{3}}{2}"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("no box") is None
    assert gsm8k_final_answer("a <<1+1=2>>2\n#### 1,010") == ("a 2", "1010")
    assert gsm8k_final_answer("no marker 5") is None


def test_gsm8k_rows_become_chats_with_reasoning_and_final_answer(tmp_path):
    rows = load_split(_cfg("gsm8k", [_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)]), "train")
    assert [r["answer"] for r in rows] == ["72", "1010"]
    user, assistant = rows[0]["messages"]
    assert user == {"role": "user", "content": GSM8K[0]["question"]}
    assert assistant["reasoning_content"] == ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips "
                                              "altogether in April and May.")
    assert assistant["content"] == "The answer is \\boxed{72}." and rows[0]["id"] == "gsm8k-0"


def test_math_rows_parquet_and_math500_prompt_only(tmp_path):
    import datasets

    path = tmp_path / "math.parquet"
    keys = ("problem", "solution", "answer", "level", "type")  # one schema: absent values are nulls, as in MATH-500
    datasets.Dataset.from_list([{k: row.get(k) for k in keys} for row in MATH]).to_parquet(str(path))
    rows = load_split(_cfg("math", eval_=[str(path)]), "eval")
    assert [r["answer"] for r in rows] == ["\\frac{3}{4}", "2", "2"]
    assert rows[0]["messages"][1]["reasoning_content"] == MATH[0]["solution"]
    assert len(rows[2]["messages"]) == 1  # no solution: prompt only
    assert rows[0]["level"] == "Level 2" and rows[0]["type"] == "Algebra"  # extra columns kept for breakdowns
    with pytest.raises(DataValidationError, match=r"math\.parquet: row 2: field 'messages': no assistant message"):
        load_split(_cfg("math", train=[str(path)]), "train")  # SFT needs a solution


def test_chat_reasoning_openr1_style_from_save_to_disk_directory(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(OPENR1)}).save_to_disk(str(tmp_path / "openr1"))
    rows = load_split(_cfg("chat", train=[str(tmp_path / "openr1" / "train")]), "train")
    assert rows[0]["answer"] == "4" and rows[0]["source"] == "amc" and rows[0]["messages"] == OPENR1[0]["messages"]
    with pytest.raises(DataValidationError, match=r"saved DatasetDict with splits \['train'\]; name one split's directory"):
        load_split(_cfg("chat", train=[str(tmp_path / "openr1")]), "train")


def test_prompt_only_rows_feed_rl_prompts(tmp_path, tiny_tokenizer):
    rows = load_split(_cfg("prompts", train=[_jsonl(tmp_path / "p.jsonl", PROMPTS)]), "train", require_assistant=False)
    prompts = to_prompts(tiny_tokenizer, rows)
    assert [p.answer for p in prompts] == ["42", "2"]
    assert prompts[0].text == generation_prompt(tiny_tokenizer, [{"role": "user", "content": "What is 6 times 7?"}])
    assert prompts[1].text == generation_prompt(tiny_tokenizer, [{"role": "user", "content": "3-1?"}])


def test_column_mapping_renames_fields(tmp_path):
    renamed = [{"q": row["question"], "sol": row["answer"]} for row in GSM8K]
    rows = load_split(_cfg("gsm8k", [_jsonl(tmp_path / "g.jsonl", renamed)], columns={"question": "q", "answer": "sol"}),
                      "train")
    assert [r["answer"] for r in rows] == ["72", "1010"]
    with pytest.raises(DataValidationError, match=r"data.columns.prompt: format 'gsm8k' reads only"):
        load_split(_cfg("gsm8k", [_jsonl(tmp_path / "g.jsonl", renamed)], columns={"prompt": "q"}), "train")


@pytest.mark.parametrize("fmt, bad, reason", [
    ("gsm8k", {"q": "x", "answer": "#### 1"},
     (r"bad\.jsonl:3: field 'question': missing column 'question' \(columns here: \['answer', 'q'\]\); set "
      r"data\.columns\.question")),
    ("gsm8k", {"question": "x", "answer": "it is 5"}, r"bad\.jsonl:3: field 'answer': column 'answer' does not end in '#### "),
    ("math", {"problem": "x", "solution": "it is 5"}, r"bad\.jsonl:3: field 'solution': column 'solution' has no \\boxed"),
    ("prompts", {"prompt": "x"}, r"bad\.jsonl:3: field 'answer': missing column 'answer'"),
    ("chat", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
     r"bad\.jsonl:3: field 'messages\[1\]\.content': empty answer"),
])
def test_bad_rows_name_file_line_field_and_fix(tmp_path, fmt, bad, reason):
    good = {"gsm8k": GSM8K[0], "math": MATH[1], "prompts": PROMPTS[0], "chat": OPENR1[0]}[fmt]
    path = _jsonl(tmp_path / "bad.jsonl", [good, bad, good], blank_after_first=True)  # line 2 blank: the bad row is line 3
    with pytest.raises(DataValidationError, match=reason):
        load_split(_cfg(fmt, [path]), "train", require_assistant=fmt not in ("prompts",))


def test_every_bad_row_is_reported_at_once(tmp_path):
    rows = [GSM8K[0], {"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}, {"answer": "#### 3"}]
    with pytest.raises(DataValidationError, match=r"^3 problem\(s\)") as err:
        load_split(_cfg("gsm8k", [_jsonl(tmp_path / "g.jsonl", rows)]), "train")
    assert all(f"g.jsonl:{line}:" in str(err.value) for line in (2, 3, 4))


def test_eval_rows_need_a_reference_answer(tmp_path):
    chat = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no box here"}]}]
    with pytest.raises(DataValidationError, match=r"e\.jsonl:1: field 'answer': no reference answer"):
        load_split(_cfg("chat", eval_=[_jsonl(tmp_path / "e.jsonl", chat)]), "eval")
