"""Chat rendering: `messages` -> token ids with a per-token assistant (loss) mask.

The format is ChatML with reasoning in think tags (the Qwen2.5/Qwen3 convention)::

    <|im_start|>system\\n{content}<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n\\n{content}<|im_end|>\\n

The assistant body from ``<think>`` to ``<|im_end|>`` carries the loss; the header ``<|im_start|>assistant\\n``
is the generation prompt. Segments are tokenized one by one so that the loss boundary is exact (no offset
mapping), which is identical to tokenizing the whole text whenever segments meet at special tokens, as here.
``CHAT_TEMPLATE`` is the same format as a Jinja template, saved with the embedded tokenizer so that
``tokenizer.apply_chat_template`` (used for generation prompts) agrees with training (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- if message.get('reasoning_content') -%}"
    "{{ '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' }}"
    "{%- endif -%}{{ message['content'] }}"
    "{%- else -%}{{ message['content'] }}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Segment:
    """A run of text in a rendered chat. ``turn`` counts assistant turns (0-based) the segment belongs to."""

    text: str
    loss: bool  # True for assistant reasoning + answer tokens
    role: str
    turn: int
    part: str  # "prompt" (system/user/headers), "reasoning", "answer"


def split_reasoning(message: dict) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message: from `reasoning_content`, or from think tags in `content`."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if reasoning is None and THINK_OPEN in content and THINK_CLOSE in content:
        head, _, rest = content.partition(THINK_OPEN)
        reasoning, _, content = rest.partition(THINK_CLOSE)
        content = (head + content).strip()
        reasoning = reasoning.strip()
    return (reasoning or "").strip(), content.strip()


def render_segments(messages: list[dict]) -> list[Segment]:
    """The chat as segments; concatenating their text gives exactly ``CHAT_TEMPLATE``'s output."""
    segments, turn = [], 0
    for message in messages:
        role = message["role"]
        if role == "assistant":
            reasoning, answer = split_reasoning(message)
            segments.append(Segment(f"{IM_START}assistant\n", False, role, turn, "prompt"))
            if reasoning:
                segments.append(Segment(f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n", True, role, turn, "reasoning"))
            segments.append(Segment(f"{answer}{IM_END}", True, role, turn, "answer"))
            segments.append(Segment("\n", False, role, turn, "prompt"))
            turn += 1
        else:
            segments.append(Segment(f"{IM_START}{role}\n{message['content']}{IM_END}\n", False, role, turn, "prompt"))
    return segments


def generation_prompt(messages: list[dict]) -> str:
    """Text that asks the model for the next assistant turn (earlier reasoning dropped, as at inference)."""
    history = []
    for message in messages:
        if message["role"] == "assistant":
            _, answer = split_reasoning(message)
            history.append({"role": "assistant", "content": answer, "reasoning_content": ""})  # dropped
        else:
            history.append(message)
    return "".join(s.text for s in render_segments(history)) + f"{IM_START}assistant\n"


def tokenize_segments(tokenizer, segments: list[Segment]) -> tuple[list[int], list[bool], list[int]]:
    """(token ids, loss mask, segment index per token) for rendered segments."""
    ids, loss, seg_index = [], [], []
    for i, segment in enumerate(segments):
        piece = tokenizer.encode(segment.text, add_special_tokens=False)
        ids.extend(piece)
        loss.extend([segment.loss] * len(piece))
        seg_index.extend([i] * len(piece))
    return ids, loss, seg_index
