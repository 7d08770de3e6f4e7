"""n-gram decontamination: the pure overlap rule (golden values by hand) and the data.decontaminate option."""

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data_pipelines.decontamination import contaminated, overlap_fractions, word_ngrams
from data_pipelines.loading import load_split
from data_pipelines.validation import DataValidationError


def test_word_ngrams_lowercase_words_and_short_texts():
    assert word_ngrams("The cat, the HAT.", 2) == {("the", "cat"), ("cat", "the"), ("the", "hat")}
    assert word_ngrams("two words", 3) == {("two", "words")}
    assert word_ngrams("...", 3) == set()


def test_overlap_fraction_and_threshold_by_hand():
    eval_texts = ["a b c d e", "x y z"]
    train = ["a b c q r",  # 3-grams abc, bcq, cqr: 1 of 3 shared
             "p a b c d",  # pab, abc, bcd: 2 of 3 shared
             "x y z",      # identical short eval prompt: 1 of 1
             "q r s t"]    # none
    assert overlap_fractions(train, eval_texts, 3) == pytest.approx([1 / 3, 2 / 3, 1.0, 0.0])
    assert contaminated(train, eval_texts, 3) == [True, True, True, False]  # threshold 0: any shared n-gram
    assert contaminated(train, eval_texts, 3, threshold=0.5) == [False, True, True, False]
    with pytest.raises(ValueError, match="threshold"):
        contaminated(train, eval_texts, 3, threshold=1.5)


def test_option_drops_overlapping_training_rows_and_counts_them(tmp_path, caplog):
    def chat(q):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "\\boxed{1}"}], "answer": "1"}

    questions = ["Ann has 12 apples and buys 30 more apples at the big market today", "Ben has 5 pens",
                 "Cal walks 3 miles every morning before work and 2 miles after"]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(chat(q)) + "\n" for q in questions))
    (tmp_path / "test.jsonl").write_text(json.dumps(chat("Ann has 12 apples and buys 30 more apples at the big market")) + "\n")
    cfg = OmegaConf.create({"source": "files", "train_files": [str(tmp_path / "train.jsonl")],
                            "eval_files": [str(tmp_path / "test.jsonl")],
                            "decontaminate": {"ngram": 8, "threshold": 0.0, "files": []}})
    stats = {}
    with caplog.at_level(logging.WARNING):
        rows = load_split(cfg, "train", stats=stats)
    assert [r["messages"][0]["content"] for r in rows] == questions[1:]
    assert stats == {"data/decontaminated_rows": 1}
    assert "decontamination: dropped 1 of 3 training rows" in caplog.text
    cfg.eval_files = []
    with pytest.raises(DataValidationError, match="no evaluation set to compare with"):
        load_split(cfg, "train")


def test_bad_setting_names_the_key(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                                               {"role": "assistant", "content": "\\boxed{1}"}]}) + "\n")
    cfg = OmegaConf.create({"source": "files", "train_files": [str(tmp_path / "t.jsonl")], "eval_files": [str(tmp_path / "t.jsonl")],
                            "decontaminate": {"ngram": 8, "threshold": 2.0, "files": []}})
    with pytest.raises(DataValidationError, match=r"data.decontaminate: ngram=8 must be >= 0 \(0 = off\) and threshold=2.0 in \[0, 1\]"):
        load_split(cfg, "train")


def test_sft_data_statistics_carry_the_dropped_count(compose, tiny_tokenizer):
    """On the GSM8K-style fixture (templated questions): 8-grams covering half a prompt catch 10 of 1000 rows."""
    from train.sft import curriculum

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "gsm8k_style"
    cfg = compose(["experiment=quickstart", "data=gsm8k", f"data.train_files=[{fixture}/train.jsonl]",
                   f"data.eval_files=[{fixture}/test.jsonl]", "data.decontaminate.ngram=8",
                   "data.decontaminate.threshold=0.5", "trainer.row_tokens=1024"])
    _, stats = curriculum.plan(cfg, tiny_tokenizer)
    assert stats["data/decontaminated_rows"] == 10 and stats["data/train_rows"] == 990
