"""Multi-turn rollouts: each turn's prompt is exactly the inference prompt of that turn (the model's own earlier
answers, reasoning dropped), the turns build one single-pass document, and chat rewards average the turns."""

import torch

from data_pipelines.arithmetic import ArithmeticSpec, generate
from data_pipelines.chat_format import generation_prompt
from data_pipelines.multiturn import token_turns
from tests.conftest import tiny_model_path
from train.models.model_zoo import load_tokenizer
from train.rl.multiturn_rollout import (
    chat_prompts,
    generate_chats,
    merge_turns,
    score_chats,
)
from train.rl.update_batches import rollouts_to_documents
from train.workers.rollout_worker import Rollout, RolloutWorker


def _model_path(model_cache):
    return tiny_model_path(model_cache, seed=0)


class ScriptedPool:
    """RolloutPool's interface; answers every request with a scripted response (reasoning + a turn-numbered
    answer), or a truncated one for chats listed in ``truncate`` (chat index, turn)."""

    def __init__(self, tokenizer, truncate=()):
        self.tokenizer, self.truncate, self.calls = tokenizer, set(truncate), []

    def generate(self, prompts, group_size, seed, **sampling):
        turn = len(self.calls)
        self.calls.append(prompts)
        out = []
        for p, prompt in enumerate(prompts):
            ids = prompt if not isinstance(prompt, str) else self.tokenizer.encode(prompt, add_special_tokens=False)
            for g in range(group_size):
                chat = p * group_size + g if turn == 0 else p
                text = f"<think>\nstep {turn} of chat {chat}\n</think>\n\nThe answer is \\boxed{{{10 * turn + g}}}.<|im_end|>"
                response = self.tokenizer.encode(text, add_special_tokens=False)
                truncated = (chat, turn) in self.truncate
                if truncated:
                    response = response[:5]
                out.append(Rollout(p, list(ids), response, self.tokenizer.decode(response, skip_special_tokens=True), truncated, 3))
        return out


def test_turn_prompts_equal_the_inference_prompts_and_build_one_document(model_cache):
    tokenizer = load_tokenizer(_model_path(model_cache))
    rows = generate(ArithmeticSpec(turns=3), 2, seed=5)
    prompts = chat_prompts(tokenizer, rows)
    pool = ScriptedPool(tokenizer, truncate={(3, 1)})  # chat 3 stops at turn 1
    turns = generate_chats(pool, tokenizer, prompts, group_size=2, seed=0, max_new_tokens=8)
    assert [len(t) for t in turns] == [4, 4, 4]
    assert len(pool.calls[1]) == 4 and len(pool.calls[2]) == 3  # the truncated chat is not continued
    for c in range(4):
        row = rows[c // 2]
        users = [m for m in row["messages"] if m["role"] == "user"]
        history = [users[0]]
        for k in range(1, 3):
            previous = turns[k - 1][c]
            if previous.truncated:
                assert turns[k][c].meta.get("ended")
                break
            history += [{"role": "assistant", "content": previous.response_text}, users[k]]
            expected = tokenizer.encode(generation_prompt(tokenizer, history), add_special_tokens=False)
            assert turns[k][c].prompt_ids == expected  # what the model sees at inference, earlier reasoning dropped

    merged = merge_turns(turns)
    documents = rollouts_to_documents(merged)
    full, cut = documents[0], documents[3]
    assert max(token_turns(full)) == 2 and max(token_turns(cut)) == 1
    trained = [t for t, m in zip(full.input_ids, full.loss_mask) if m]
    assert trained == [t for k in range(3) for t in turns[k][0].response_ids]  # all turns' responses, with the loss
    assert len(merged[0].response_ids) == sum(len(turns[k][0].response_ids) for k in range(3))


def test_chat_reward_is_the_mean_over_turns_against_each_turns_answer(model_cache):
    tokenizer = load_tokenizer(_model_path(model_cache))
    rows = generate(ArithmeticSpec(turns=2), 1, seed=5)
    rows[0]["turn_answers"] = ["0", "10"]  # scripted answers: turn 0 -> 0 (chat 0), 1 (chat 1); turn 1 -> 10 (both)
    prompts = chat_prompts(tokenizer, rows)
    turns = generate_chats(ScriptedPool(tokenizer), tokenizer, prompts, group_size=2, seed=0)

    def exact(batch, rollouts):
        hits = torch.tensor([float(f"boxed{{{batch[r.prompt_index].answer}}}" in r.response_text) for r in rollouts])
        return hits, {"exact": hits}

    rewards, components = score_chats(exact, prompts, turns)
    # chat 0: both turns right -> 1.0; chat 1: turn 0 wrong (1 != 0), turn 1 right -> 0.5
    assert rewards.tolist() == [1.0, 0.5] and components["exact"].tolist() == [1.0, 0.5]


def test_generation_from_token_ids_equals_generation_from_text(model_cache):
    path = _model_path(model_cache)
    worker = RolloutWorker(path)
    tokenizer = worker.tokenizer
    texts = [generation_prompt(tokenizer, [{"role": "user", "content": q}]) for q in ("What is 12 + 7?", "Ann has 3 pens. Ann gets 45 more?")]
    by_text = worker.generate(texts, 2, max_new_tokens=6, seed=3)
    by_ids = worker.generate([tokenizer.encode(t, add_special_tokens=False) for t in texts], 2, max_new_tokens=6, seed=3)
    assert [(r.prompt_ids, r.response_ids) for r in by_text] == [(r.prompt_ids, r.response_ids) for r in by_ids]
