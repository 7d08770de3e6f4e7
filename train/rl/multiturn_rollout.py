"""Multi-turn rollouts: the policy answers every user turn of a chat itself, as at inference.

Turn k's prompt is turn k-1's prompt + the reasoning-free copy of the model's own answer k-1 + user turn k +
the assistant header (earlier reasoning dropped), as the model's chat template renders them, appended as token ids
so that each prompt extends the previous one token for token. That needs a template that drops earlier reasoning
(``check_drops_reasoning``; others are refused with the model's name). The result feeds the single-pass multi-turn Document
(``data_pipelines.multiturn.document_from_prompts``): one training sequence per chat, all turns' responses with
the loss, the exact per-turn visibility.

A chat whose response is truncated (no end token) stops there; its later turns get an empty, truncated response
for scoring (reward functions see every chat at every turn, so group structure holds) and no training tokens.
The chat reward is the mean over its turns. Runs on any object with RolloutPool's ``generate``.
"""

from __future__ import annotations

import torch

from data_pipelines.chat_format import ChatTemplateError, check_drops_reasoning, encode, generation_prompt, split_reasoning
from data_pipelines.prompts import Prompt
from train.workers.rollout_worker import Rollout


def chat_prompts(tokenizer, rows: list[dict], system_prompt: str | None = None) -> list[Prompt]:
    """One Prompt per chat: ``text`` asks the first question; ``meta`` keeps the system message (``chat_head``),
    every user turn and its answer."""
    check_drops_reasoning(tokenizer, "rollout.multi_turn=true", "rollout.multi_turn=false")
    prompts = []
    for row in rows:
        messages = row["messages"]
        head = [m for m in messages[:1] if m["role"] == "system"]
        if not head and system_prompt:
            head = [{"role": "system", "content": system_prompt}]
        users = [m["content"] for m in messages if m["role"] == "user"]
        answers = row.get("turn_answers") or [row.get("answer")] * len(users)
        if len(answers) != len(users):
            raise ValueError(f"row {row['id']!r}: {len(answers)} turn_answers for {len(users)} user turns; give one per turn")
        meta = {k: v for k, v in row.items() if k != "messages"}
        meta.update(user_turns=users, turn_answers=answers, chat_head=head)
        text = generation_prompt(tokenizer, head + [{"role": "user", "content": users[0]}])
        prompts.append(Prompt(row["id"], text, answers[0], meta))
    return prompts


def next_turn(tokenizer, history: list[dict], prompt_ids: list[int], response_text: str, user: str):
    """(the chat's next history, the ids appended to ``prompt_ids``) after a turn: ``prompt_ids`` is the prompt of
    ``history``; the ids are what the chat template renders for the answer without its reasoning, the next user
    turn and the assistant header."""
    answer = split_reasoning({"role": "assistant", "content": response_text.removesuffix(tokenizer.eos_token)})[1]
    history = history + [{"role": "assistant", "content": answer}, {"role": "user", "content": user}]
    next_ids = encode(tokenizer, generation_prompt(tokenizer, history))
    if next_ids[: len(prompt_ids)] != list(prompt_ids):
        raise ChatTemplateError("rollout.multi_turn=true: the chat template renders turn "
                                f"{sum(m['role'] == 'user' for m in history) - 1}'s history differently from the prompt it "
                                "gave the model; set rollout.multi_turn=false")
    return history, next_ids[len(prompt_ids):]


def generate_chats(pool, tokenizer, prompts: list[Prompt], group_size: int, seed: int, **sampling) -> list[list[Rollout]]:
    """[turn][chat] rollouts for ``group_size`` chats per prompt (chats grouped by prompt, prompt order).

    Turn 0 samples ``group_size`` responses per prompt; each later turn continues every chat with one sample."""
    turns = [pool.generate([p.text for p in prompts], group_size, seed=seed, **sampling)]
    chats = len(turns[0])
    histories = [[*prompts[r.prompt_index].meta["chat_head"], {"role": "user", "content": prompts[r.prompt_index].meta["user_turns"][0]}]
                 for r in turns[0]]  # per chat: the messages that its latest prompt renders
    max_turns = max(len(p.meta["user_turns"]) for p in prompts)
    for k in range(1, max_turns):
        previous = turns[-1]
        active = [c for c in range(chats)
                  if not previous[c].truncated and k < len(prompts[previous[c].prompt_index].meta["user_turns"])]
        requests = []
        for c in active:
            user = prompts[previous[c].prompt_index].meta["user_turns"][k]
            histories[c], context = next_turn(tokenizer, histories[c], previous[c].prompt_ids, previous[c].response_text, user)
            requests.append(previous[c].prompt_ids + context)
        generated = pool.generate(requests, 1, seed=seed + 7_777 * k, **sampling) if active else []
        current = [Rollout(previous[c].prompt_index, previous[c].prompt_ids, [], "", True, previous[c].policy_version,
                           {"ended": True}) for c in range(chats)]
        for c, rollout in zip(active, generated):
            rollout.prompt_index = previous[c].prompt_index
            current[c] = rollout
        turns.append(current)
    return turns


def merge_turns(turns: list[list[Rollout]]) -> list[Rollout]:
    """One Rollout per chat: responses concatenated (for length metrics), the turns kept in ``meta`` for the
    single-pass document (``turn_prompts`` / ``turn_responses``, ended turns left out)."""
    merged = []
    for c, first in enumerate(turns[0]):
        taken = [t[c] for t in turns if not t[c].meta.get("ended")]
        merged.append(Rollout(
            first.prompt_index, first.prompt_ids, [tok for r in taken for tok in r.response_ids],
            "\n".join(r.response_text for r in taken), any(r.truncated for r in taken), min(r.policy_version for r in taken),
            {"turn_prompts": [r.prompt_ids for r in taken], "turn_responses": [r.response_ids for r in taken],
             "turn_truncated": [r.truncated for r in taken]},
        ))
    return merged


def score_chats(score, prompts: list[Prompt], turns: list[list[Rollout]]) -> tuple[torch.Tensor, dict]:
    """Mean over turns of ``score(prompts_k, rollouts_k)`` -> (rewards [chats], components); turn k scores
    against answer k (a chat without a turn k is scored as an empty truncated response)."""
    totals, components = [], {}
    for k, rollouts in enumerate(turns):
        turn_prompts = []
        for p in prompts:
            answers = p.meta["turn_answers"]
            answer = answers[k] if k < len(answers) else None
            turn_prompts.append(Prompt(p.prompt_id, p.text, answer, {**p.meta, "answer": answer, "turn": k}))
        rewards, parts = score(turn_prompts, rollouts)
        totals.append(rewards)
        for name, value in parts.items():
            components.setdefault(name, []).append(value.float())
    return torch.stack(totals).mean(0), {name: torch.stack(v).mean(0) for name, v in components.items()}

