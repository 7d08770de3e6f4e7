"""Published chat templates (tests/fixtures/chat_templates/, sources in its README) on small local tokenizers:
the generation prompt is the template's own ``add_generation_prompt=True`` rendering, and the loss covers exactly
the tokens the model generates at inference (its reasoning and answer, then the template's end-of-turn token).

Each tokenizer is byte-level with no merges (every character its own token) plus the special tokens its template
writes, built here: ids then follow from the text alone, so expected ids are the encoding of hand-written text."""

from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from data_pipelines.chat_format import (
    ChatTemplateError,
    assistant_turns,
    chat_ids,
    check_drops_reasoning,
    encode,
    generation_prompt,
)
from data_pipelines.multiturn import chat_documents

TEMPLATES = Path(__file__).parents[1] / "fixtures/chat_templates"

# family: (template file, special tokens, bos, eos as shipped, end of an assistant turn, where the reasoning goes,
#          whether a system message is allowed)
FAMILIES = {
    "qwen2.5": ("qwen2_5.jinja", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>"),
    "qwen3": ("qwen3.jinja", ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], None,
              "<|im_end|>", "<|im_end|>"),
    "llama-3.1": ("llama3_1.jinja", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                     "<|eom_id|>"], "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "deepseek-r1-distill": ("deepseek_r1_distill.jinja", ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                                                          "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"],
                            "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "gemma-2": ("gemma.jinja", ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
                "<end_of_turn>"),
    "gemma-3": ("gemma3.jinja", ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
                "<end_of_turn>"),
}
NO_SYSTEM = {"gemma-2"}  # its template raises on a system message
DROPS_REASONING = {"qwen3"}  # drops earlier reasoning and keeps each later prompt an extension: single-pass works
REASONING = "12+30: 2+0=2, 1+3=4. So 42."
ANSWER = "The answer is \\boxed{42}."


def family_tokenizer(family: str) -> PreTrainedTokenizerFast:
    file, specials, bos, eos, _ = FAMILIES[family]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos,
                                   chat_template=(TEMPLATES / file).read_text(), name_or_path=f"fixture-{family}")


def chat(family: str, turns: int = 1) -> list[dict]:
    messages = [] if family in NO_SYSTEM else [{"role": "system", "content": "Answer in \\boxed{}."}]
    for k in range(turns):
        messages.append({"role": "user", "content": f"What is 12+{30 + k}?"})
        messages.append({"role": "assistant", "content": f"<think>\n{REASONING} (turn {k})\n</think>\n\n{ANSWER}"})
    return messages


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


def test_generation_prompt_is_the_templates_own(family):
    tokenizer = family_tokenizer(family)
    messages = chat(family)[:-1]  # no assistant message: nothing to convert
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert generation_prompt(tokenizer, messages) == expected
    assert assistant_turns(tokenizer, chat(family))[0].prompt == expected


def test_loss_covers_exactly_what_the_model_generates(family):
    tokenizer, end = family_tokenizer(family), FAMILIES[family][4]
    messages = chat(family)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    # generated at inference after that prompt: the reasoning in think tags (the R1 prompt already opened the
    # think block), the answer, the end-of-turn token
    opened = prompt.endswith("<think>\n")
    generated = ("" if opened else "<think>\n") + f"{REASONING} (turn 0)\n</think>\n\n{ANSWER}"
    ids, loss = chat_ids(tokenizer, messages)
    first = loss.index(True)
    trained = [i for i, keep in zip(ids, loss) if keep]
    assert ids[:first] == encode(tokenizer, prompt)
    assert trained == encode(tokenizer, generated + end)
    assert loss[first:first + len(trained)] == [True] * len(trained)  # one contiguous span
    # the template's own rendering of the finished chat is prompt + generated + end-of-turn (+ what it puts after),
    # except where the template strips the reasoning from the finished turn (DeepSeek-R1-Distill)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if family == "deepseek-r1-distill":
        assert REASONING not in full and full.endswith(f"\n\n{ANSWER}{end}")
    else:
        assert full.startswith(prompt + generated + end)
        assert ids == encode(tokenizer, full)


def test_reasoning_goes_where_the_template_reads_it(family):
    tokenizer = family_tokenizer(family)
    field = {"role": "assistant", "content": ANSWER, "reasoning_content": f"{REASONING} (turn 0)"}
    in_tags = chat(family)
    # a row with reasoning_content and a row with think tags are the same training example
    assert chat_ids(tokenizer, in_tags[:-1] + [field]) == chat_ids(tokenizer, in_tags)


def test_single_pass_multi_turn_needs_a_template_that_drops_reasoning(family):
    tokenizer = family_tokenizer(family)
    messages = chat(family, turns=2)
    per_turn = chat_documents(tokenizer, messages, "per_turn", "c")
    second_prompt = assistant_turns(tokenizer, messages)[1].prompt
    assert per_turn[1].input_ids[: per_turn[1].loss_mask.index(True)] == encode(tokenizer, second_prompt)
    if family in DROPS_REASONING:
        assert "(turn 0)" not in second_prompt
        (document,) = chat_documents(tokenizer, messages, "single_pass", "c")
        # what each response sees in the single pass (tokens of the visible segments, their positions) is exactly
        # its per-turn document
        for k, expected in enumerate(per_turn):
            own = 2 * k + 1 if k < len(per_turn) - 1 else 2 * k  # response k's segment (data_pipelines/multiturn.py)
            visible = [i for i, s in enumerate(document.segment_ids) if document.visibility[own][s]]
            assert [document.input_ids[i] for i in visible] == expected.input_ids
            assert [document.position_ids[i] for i in visible] == list(range(len(expected)))
        return
    with pytest.raises(ChatTemplateError, match=f"data.multi_turn=single_pass .*'fixture-{family}'.*"
                                                "set data.multi_turn=per_turn"):
        chat_documents(tokenizer, messages, "single_pass", "c")
    with pytest.raises(ChatTemplateError, match="rollout.multi_turn=true .*set rollout.multi_turn=false"):
        check_drops_reasoning(tokenizer, "rollout.multi_turn=true", "rollout.multi_turn=false")


def test_template_refusals_are_one_line_errors():
    tokenizer = family_tokenizer("gemma-2")
    with pytest.raises(ChatTemplateError, match="'fixture-gemma-2' refuses this chat: System role not supported"):
        generation_prompt(tokenizer, [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])


def test_loaded_tokenizer_stops_at_the_templates_end_of_turn(tmp_path):
    from train.models.model_zoo import load_tokenizer

    family_tokenizer("gemma-3").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.eos_token == "<end_of_turn>"  # shipped eos is <eos>; turns end with <end_of_turn>
