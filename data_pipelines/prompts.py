"""Prompts for RL: chat rows -> generation prompts with their reference answers, and a resumable sampler."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from data_pipelines.chat_format import generation_prompt


@dataclass
class Prompt:
    prompt_id: str
    text: str  # generation prompt rendered by the chat template (ends where the response starts)
    answer: str | None  # reference answer for verifiable rewards
    meta: dict = field(default_factory=dict)  # difficulty, filler sentences, ... (passed to reward functions)


def prompt_messages(row: dict) -> list[dict]:
    """The chat up to (not including) its last assistant turn: what the model must answer."""
    messages = row["messages"]
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return messages[: assistant_turns[-1]] if assistant_turns else messages


def to_prompts(tokenizer, rows: list[dict], system_prompt: str | None = None) -> list[Prompt]:
    """One Prompt per row: its chat up to the last assistant turn, rendered by the tokenizer's chat template."""
    prompts = []
    for row in rows:
        messages = prompt_messages(row)
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        meta = {k: v for k, v in row.items() if k not in ("messages",)}
        prompts.append(Prompt(row["id"], generation_prompt(tokenizer, messages), row.get("answer"), meta))
    return prompts


class PromptSampler:
    """Epochs of shuffled prompts, ``batch_size`` at a time; (epoch, index) is the whole state."""

    def __init__(self, prompts: list[Prompt], batch_size: int, seed: int):
        if batch_size > len(prompts):
            raise ValueError(f"rollout.prompts_per_step={batch_size} exceeds the {len(prompts)} training prompts")
        self.prompts, self.batch_size, self.seed = prompts, batch_size, seed
        self.epoch, self.index = 0, 0

    def _order(self) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 7_919 + self.epoch).shuffle(order)
        return order

    def next(self) -> list[Prompt]:
        if (self.index + 1) * self.batch_size > len(self.prompts):  # drop the ragged tail of an epoch
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order()
        batch = [self.prompts[i] for i in order[self.index * self.batch_size : (self.index + 1) * self.batch_size]]
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
