from data_pipelines.arithmetic import ArithmeticSpec, generate
from data_pipelines.chat_format import generation_prompt, render_segments, tokenize_segments


def test_segments_match_the_saved_chat_template(tiny_tokenizer):
    for row in generate(ArithmeticSpec(turns=2, verbosity=0.5), 5, seed=3):
        segments = render_segments(row["messages"])
        text = "".join(s.text for s in segments)
        assert text == tiny_tokenizer.apply_chat_template(row["messages"], tokenize=False)
        ids, loss, _ = tokenize_segments(tiny_tokenizer, segments)
        assert ids == tiny_tokenizer.encode(text, add_special_tokens=False)
        # the trained tokens decode to exactly the assistant bodies
        trained = tiny_tokenizer.decode([i for i, l in zip(ids, loss) if l])
        bodies = "".join(s.text for s in segments if s.loss)
        assert trained == bodies
        assert bodies.count("<think>") == 2 and bodies.count("<|im_end|>") == 2


def test_generation_prompt_drops_earlier_reasoning(tiny_tokenizer):
    row = generate(ArithmeticSpec(turns=2), 1, seed=0)[0]
    prompt = generation_prompt(row["messages"][:3])
    assert "<think>" not in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert row["messages"][1]["content"] in prompt
    history = [row["messages"][0], {"role": "assistant", "content": row["messages"][1]["content"]}, row["messages"][2]]
    assert prompt == tiny_tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
