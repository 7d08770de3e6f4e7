"""Chats through the tokenizer's own chat template: generation prompts, and training ids with exact loss spans.

Every consumer (SFT documents, RL prompts, held-out evaluation, multi-turn rollouts, synthesis) renders with
``tokenizer.apply_chat_template``, so a Llama-3, Gemma or DeepSeek-R1-Distill model is trained and asked in the
format it was released with. The embedded tiny model's ChatML (``CHAT_TEMPLATE``) is one template among others.

Loss spans, for any template, by rendering prefixes. For the assistant message at index i of a chat:
- the generation prompt ``P`` = the template on ``messages[:i]`` with ``add_generation_prompt=True`` (what the
  model is given at inference; the template decides how earlier turns look, e.g. Qwen3 and DeepSeek-R1 drop
  their reasoning);
- the finished turn ``C`` = the template on ``messages[:i+1]``. ``C`` must start with ``P``; the text after
  ``P`` up to and including the template's end-of-turn token (the first added token after the answer) is what
  the model generates: the response, with the loss. What the template puts after it (ChatML's newline) is not.
Prompt and response are tokenized separately, which is what inference does (prompt ids + generated ids).

Reasoning, the way each family expects: a template that reads a ``reasoning_content`` field (Qwen3, the
embedded ChatML) gets the reasoning there; any other gets ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}`` as
content (the DeepSeek-R1 convention). A template that strips the reasoning even from the finished turn
(DeepSeek-R1-Distill: ``content.split('</think>')[-1]``) is rendered with the answer alone and the think block
put back before the answer, so the model still learns to generate its reasoning (after the ``<think>\\n`` that
such a template's generation prompt ends with).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jinja2.exceptions import TemplateError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# The embedded tiny model's template (saved on its tokenizer): ChatML with reasoning in think tags, rendered for
# the last message only, so earlier turns' reasoning is dropped from the history (single-pass multi-turn needs it).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- if message.get('reasoning_content') and loop.last -%}"
    "{{ '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' }}"
    "{%- endif -%}{{ message['content'] }}"
    "{%- else -%}{{ message['content'] }}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_PROBE_REASONING = "probe reasoning 7919"


class ChatTemplateError(ValueError):
    """A chat the model's template cannot render, or a template that cannot give what a setting needs."""


@dataclass(frozen=True)
class AssistantTurn:
    """One assistant message of a chat, as text rendered by the template."""

    prompt: str  # the generation prompt: everything before the response
    response: str  # what the model generates: (reasoning +) answer + end-of-turn token; the loss span
    after: str  # what the template renders after the end-of-turn token (no loss)


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


def model_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def template_text(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one renders chats
        template = template.get("default")
    if not template:
        raise ChatTemplateError(
            f"the tokenizer of {model_name(tokenizer)!r} has no chat template: use a chat/instruct checkpoint, or "
            "add a `chat_template` to its tokenizer_config.json"
        )
    return template


def reads_reasoning_field(tokenizer) -> bool:
    """True if the template reads the reasoning from ``reasoning_content`` (else it goes in think tags)."""
    return "reasoning_content" in template_text(tokenizer)


def think_block(reasoning: str) -> str:
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n" if reasoning else ""


def template_messages(tokenizer, messages: list[dict]) -> list[dict]:
    """``messages`` with each assistant's reasoning where the template expects it (field or think tags)."""
    field = reads_reasoning_field(tokenizer)
    converted = []
    for message in messages:
        if message["role"] != "assistant":
            converted.append({"role": message["role"], "content": message["content"]})
            continue
        reasoning, answer = split_reasoning(message)
        if field:
            converted.append({"role": "assistant", "content": answer, "reasoning_content": reasoning})
        else:
            converted.append({"role": "assistant", "content": think_block(reasoning) + answer})
    return converted


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The template's text for already converted ``messages``; a template's own refusal becomes one line."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:
        raise ChatTemplateError(f"the chat template of {model_name(tokenizer)!r} refuses this chat: {err}") from None


def generation_prompt(tokenizer, messages: list[dict]) -> str:
    """Text that asks the model for the next assistant turn after ``messages`` (the template's own rendering
    with ``add_generation_prompt=True``; earlier reasoning kept or dropped as the template does)."""
    return render(tokenizer, template_messages(tokenizer, messages), add_generation_prompt=True)


def encode(tokenizer, text: str) -> list[int]:
    """Ids of rendered text (the template writes any BOS itself)."""
    return tokenizer.encode(text, add_special_tokens=False)


def _end_of_turn(tokenizer, after_answer: str) -> str:
    """The text from the answer's end through the template's end-of-turn token: optional whitespace, then the
    longest added token that starts there (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ...)."""
    gap = re.match(r"\s*", after_answer).group(0)
    rest = after_answer[len(gap):]
    tokens = set(tokenizer.get_added_vocab()) | {tokenizer.eos_token or ""}
    matches = [t for t in tokens if t and rest.startswith(t)]
    if not matches:
        raise ChatTemplateError(
            f"the chat template of {model_name(tokenizer)!r} puts no special token after the assistant's answer "
            f"(it continues {after_answer[:30]!r}), so the end of a generated turn is unknown: use a template that "
            "closes assistant turns with an end-of-turn token"
        )
    return gap + max(matches, key=len)


def _turn(tokenizer, converted: list[dict], i: int, reasoning: str, answer: str) -> AssistantTurn:
    name = model_name(tokenizer)
    prompt = render(tokenizer, converted[:i], add_generation_prompt=True)
    full = render(tokenizer, converted[: i + 1], add_generation_prompt=False)
    if reasoning and reasoning not in full[len(prompt):]:
        # the template strips reasoning from the finished turn too (DeepSeek-R1-Distill): put it back before the
        # answer, where the model generates it
        plain = render(tokenizer, converted[:i] + [{"role": "assistant", "content": answer}], False)
        at = plain.rfind(answer)
        if at < 0:
            raise ChatTemplateError(f"the chat template of {name!r} does not render the assistant's answer verbatim")
        full = plain[:at] + think_block(reasoning) + plain[at:]
    if not full.startswith(prompt):
        raise ChatTemplateError(
            f"the chat template of {name!r} renders a finished assistant turn that does not start with its own "
            f"generation prompt (prompt ends {prompt[-40:]!r}, chat has {full[len(prompt) - 40:len(prompt)]!r}), "
            "so the tokens the model generates cannot be told apart: fix the template's add_generation_prompt branch"
        )
    body = full[len(prompt):]
    at = body.rfind(answer)
    if at < 0:
        raise ChatTemplateError(f"the chat template of {name!r} does not render the assistant's answer verbatim")
    end = at + len(answer) + len(_end_of_turn(tokenizer, body[at + len(answer):]))
    return AssistantTurn(prompt, body[:end], body[end:])


def assistant_turns(tokenizer, messages: list[dict]) -> list[AssistantTurn]:
    """Every assistant message of ``messages`` as (generation prompt, generated response, text after)."""
    converted = template_messages(tokenizer, messages)
    return [
        _turn(tokenizer, converted, i, *split_reasoning(message))
        for i, message in enumerate(messages)
        if message["role"] == "assistant"
    ]


def chat_ids(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(ids, loss mask) of the chat's last assistant turn in its context: generation prompt, response (loss),
    what the template puts after it. Multi-turn chats: data_pipelines/multiturn.py (one pass or per turn)."""
    turn = assistant_turns(tokenizer, messages)[-1]
    prompt, response, after = (encode(tokenizer, t) for t in (turn.prompt, turn.response, turn.after))
    return prompt + response + after, [False] * len(prompt) + [True] * len(response) + [False] * len(after)


def end_of_turn_token(tokenizer) -> str:
    """The token that ends a generated assistant turn in this template (generation must stop there)."""
    turn = assistant_turns(tokenizer, [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}])[0]
    return _end_of_turn(tokenizer, turn.response[turn.response.rfind("2") + 1:]).strip()


def check_drops_reasoning(tokenizer, setting: str, fix: str) -> None:
    """Raise unless the template drops earlier turns' reasoning from later prompts and each turn's prompt extends
    the previous one token for token: what one-pass training of a multi-turn chat (``setting``) needs."""
    name = model_name(tokenizer)
    first = [{"role": "user", "content": "What is 1+1?"}]
    second = first + [
        {"role": "assistant", "content": "2", "reasoning_content": _PROBE_REASONING},
        {"role": "user", "content": "And 2+2?"},
    ]
    prompt_0, prompt_1 = generation_prompt(tokenizer, first), generation_prompt(tokenizer, second)
    if _PROBE_REASONING in prompt_1:
        raise ChatTemplateError(
            f"{setting} needs a chat template that drops earlier reasoning from the history (as Qwen3's and the "
            f"embedded ChatML do); the chat template of {name!r} keeps it: set {fix}"
        )
    ids_0, ids_1 = encode(tokenizer, prompt_0), encode(tokenizer, prompt_1)
    if ids_1[: len(ids_0)] != ids_0:
        raise ChatTemplateError(
            f"{setting} needs each turn's prompt to extend the previous turn's prompt; the chat template of {name!r} "
            f"renders turn 1's history differently (turn 0's prompt ends {prompt_0[-30:]!r}): set {fix}"
        )
