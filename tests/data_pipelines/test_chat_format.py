"""The embedded tiny model's ChatML, rendered through its tokenizer's chat template like any other model's: the
same token ids, loss masks and multi-turn layouts as the hard-coded renderer it replaced (golden values written by
that renderer at commit 22b88ce, tests/fixtures/chat_templates/chatml_legacy_ids.json)."""

import json
from pathlib import Path

import pytest

from data_pipelines.arithmetic import ArithmeticSpec, generate
from data_pipelines.chat_format import (
    CHAT_TEMPLATE,
    assistant_turns,
    chat_ids,
    check_drops_reasoning,
    end_of_turn_token,
    generation_prompt,
)
from data_pipelines.multiturn import chat_documents
from data_pipelines.prompts import prompt_messages

LEGACY = json.loads((Path(__file__).parents[1] / "fixtures/chat_templates/chatml_legacy_ids.json").read_text())["rows"]


def _doc_fields(document):
    return {"input_ids": document.input_ids, "loss_mask": document.loss_mask, "position_ids": document.position_ids,
            "segment_ids": document.segment_ids, "visibility": document.visibility}


def test_tiny_tokenizer_carries_the_chatml_template(tiny_tokenizer):
    assert tiny_tokenizer.chat_template == CHAT_TEMPLATE
    assert end_of_turn_token(tiny_tokenizer) == "<|im_end|>" == tiny_tokenizer.eos_token


@pytest.mark.parametrize("row", LEGACY, ids=[r["id"] for r in LEGACY])
def test_template_path_gives_the_old_renderers_ids(tiny_tokenizer, row):
    messages = row["messages"]
    assert generation_prompt(tiny_tokenizer, prompt_messages({"messages": messages})) == row["generation_prompt"]
    for mode in ("single_pass", "per_turn"):
        assert [_doc_fields(d) for d in chat_documents(tiny_tokenizer, messages, mode, row["id"])] == row[mode]
    if sum(m["role"] == "assistant" for m in messages) == 1:
        assert chat_ids(tiny_tokenizer, messages) == (row["full_ids"], row["full_loss"])


def test_loss_covers_reasoning_answer_and_end_of_turn_only(tiny_tokenizer):
    row = generate(ArithmeticSpec(verbosity=0.5), 1, seed=3)[0]
    ids, loss = chat_ids(tiny_tokenizer, row["messages"])
    reasoning, answer = row["messages"][-1]["reasoning_content"], row["messages"][-1]["content"]
    trained = tiny_tokenizer.decode([i for i, keep in zip(ids, loss) if keep])
    assert trained == f"<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>"
    untrained_tail = tiny_tokenizer.decode(ids[max(i for i, keep in enumerate(loss) if keep) + 1:])
    assert untrained_tail == "\n"


def test_generation_prompt_drops_earlier_reasoning(tiny_tokenizer):
    row = generate(ArithmeticSpec(turns=2), 1, seed=0)[0]
    prompt = generation_prompt(tiny_tokenizer, row["messages"][:3])
    assert "<think>" not in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert row["messages"][1]["content"] in prompt
    turns = assistant_turns(tiny_tokenizer, row["messages"])
    assert turns[1].prompt == prompt and turns[1].response.startswith("<think>\n")
    check_drops_reasoning(tiny_tokenizer, "data.multi_turn=single_pass", "data.multi_turn=per_turn")  # no error
