"""Single-pass multi-turn layout: the token-level mask, positions and labels of a hand-written chat, the one-turn
reduction to ordinary SFT, the RL entry point, and the rejection of malformed chats.
Loss/gradient equality with the per-turn expansion is in test_multiturn_equivalence.py."""

import re

import pytest
import torch

from data_pipelines.arithmetic import ArithmeticSpec, generate
import jinja2

from data_pipelines.chat_format import (
    CHAT_TEMPLATE,
    IM_END,
    IM_START,
    THINK_CLOSE,
    THINK_OPEN,
    chat_ids,
    generation_prompt,
    split_reasoning,
)
from data_pipelines.multiturn import (
    MultiTurnChatError,
    build_document,
    chat_documents,
    check_mode,
    document_from_messages,
    document_from_prompts,
    per_turn_documents,
    token_turns,
)
from data_pipelines.packing import IGNORE_INDEX, Document, collate
from train.models.attention import allowed

SPECIALS = (IM_START, IM_END, THINK_OPEN, THINK_CLOSE)


class PieceTokenizer:
    """Splits at special tokens and think tags (as the real tokenizer does), and after the assistant header and
    between the think block's closing "\n\n" and the answer (where byte-level pre-tokenizers split at the
    newline), and makes each text run between them ONE token, so a hand-written chat has few, nameable tokens.
    Renders chats with the embedded ChatML template, as a tokenizer's ``apply_chat_template`` does."""

    chat_template, eos_token, name_or_path = CHAT_TEMPLATE, IM_END, "piece-tokenizer"

    def __init__(self):
        self.vocab = {}

    def encode(self, text, add_special_tokens=False):
        split = "(" + "|".join(map(re.escape, SPECIALS)) + "|\n\n)|(?<=assistant\n)"
        return [self.vocab.setdefault(p, len(self.vocab)) for p in re.split(split, text) if p]

    def get_added_vocab(self):
        return {token: self.vocab.setdefault(token, len(self.vocab)) for token in SPECIALS}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert not tokenize
        return jinja2.Environment().from_string(CHAT_TEMPLATE).render(messages=messages,
                                                                    add_generation_prompt=add_generation_prompt)


HAND_CHAT = [
    {"role": "user", "content": "q1"},
    {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "reasoning_content": "r2", "content": "a2"},
]

# The single-pass sequence of HAND_CHAT, one token per line: (text, position, loss), in four groups
# X0 = turn 0's prompt | R0 = turn 0's response | X1 = reasoning-free copy of a1 + turn 1's prompt | R1 + "\n".
HAND_TOKENS = [
    # X0 (segment 0)
    (IM_START, 0, 0), ("user\nq1", 1, 0), (IM_END, 2, 0), ("\n", 3, 0), (IM_START, 4, 0), ("assistant\n", 5, 0),
    # R0 (segment 1): the with-reasoning copy of a1, trained
    (THINK_OPEN, 6, 1), ("\nr1\n", 7, 1), (THINK_CLOSE, 8, 1), ("\n\n", 9, 1), ("a1", 10, 1), (IM_END, 11, 1),
    # X1 (segment 2): a1 again, where turn 1's prompt has it (positions restart at 6), then turn 1's prompt
    ("a1", 6, 0), (IM_END, 7, 0), ("\n", 8, 0), (IM_START, 9, 0), ("user\nq2", 10, 0), (IM_END, 11, 0),
    ("\n", 12, 0), (IM_START, 13, 0), ("assistant\n", 14, 0),
    # R1 (also segment 2: nothing comes after the last turn), trained, then the closing "\n"
    (THINK_OPEN, 15, 1), ("\nr2\n", 16, 1), (THINK_CLOSE, 17, 1), ("\n\n", 18, 1), ("a2", 19, 1), (IM_END, 20, 1),
    ("\n", 21, 0),
]

# allowed(query row, key column), written by hand; groups as above (X0 6 | R0 6 | X1 9 | R1 7).
HAND_MASK = """
1..... ...... ......... .......
11.... ...... ......... .......
111... ...... ......... .......
1111.. ...... ......... .......
11111. ...... ......... .......
111111 ...... ......... .......
111111 1..... ......... .......
111111 11.... ......... .......
111111 111... ......... .......
111111 1111.. ......... .......
111111 11111. ......... .......
111111 111111 ......... .......
111111 ...... 1........ .......
111111 ...... 11....... .......
111111 ...... 111...... .......
111111 ...... 1111..... .......
111111 ...... 11111.... .......
111111 ...... 111111... .......
111111 ...... 1111111.. .......
111111 ...... 11111111. .......
111111 ...... 111111111 .......
111111 ...... 111111111 1......
111111 ...... 111111111 11.....
111111 ...... 111111111 111....
111111 ...... 111111111 1111...
111111 ...... 111111111 11111..
111111 ...... 111111111 111111.
111111 ...... 111111111 1111111
"""


def test_hand_written_two_turn_chat_token_by_token():
    tokenizer = PieceTokenizer()
    doc = document_from_messages(tokenizer, HAND_CHAT, "hand")
    names = {i: p for p, i in tokenizer.vocab.items()}
    assert [names[t] for t in doc.input_ids] == [text for text, _, _ in HAND_TOKENS]
    assert doc.position_ids == [pos for _, pos, _ in HAND_TOKENS]
    assert doc.loss_mask == [bool(loss) for _, _, loss in HAND_TOKENS]
    assert token_turns(doc) == [0] * 12 + [1] * 16

    batch = collate([[doc]], pad_token_id=0)
    mask = allowed(batch.segment_ids, batch.visibility)[0]
    expected = [line.replace(" ", "") for line in HAND_MASK.strip().splitlines()]
    assert len(expected) == len(doc) == mask.shape[0]
    for q, row in enumerate(expected):
        for k, entry in enumerate(row):
            assert bool(mask[q, k]) == (entry == "1"), f"query {q} ({HAND_TOKENS[q][0]!r}), key {k} ({HAND_TOKENS[k][0]!r})"
    # HF labels: the token id where trained; position t-1 predicts label t, and the token before each
    # response is its own turn's assistant header (token 5 for R0, token 20 for R1)
    labels = batch.labels[0].tolist()
    assert [t != IGNORE_INDEX for t in labels] == doc.loss_mask
    assert names[doc.input_ids[5]] == names[doc.input_ids[20]] == "assistant\n"


def test_hand_written_chat_matches_its_per_turn_expansion():
    """Each token sits at the position, and sees the tokens, it has in its own turn's expanded sequence."""
    tokenizer = PieceTokenizer()
    doc = document_from_messages(tokenizer, HAND_CHAT, "hand")
    turn0, turn1 = per_turn_documents(tokenizer, HAND_CHAT, "hand")
    names = {i: p for p, i in tokenizer.vocab.items()}
    texts = [text for text, _, _ in HAND_TOKENS]
    assert [names[t] for t in turn0.input_ids] == texts[:12]  # X0 R0
    assert [names[t] for t in turn1.input_ids] == texts[:6] + texts[12:]  # X0 X1 R1 "\n": reasoning r1 dropped
    mask = allowed(torch.tensor([doc.segment_ids]), torch.tensor([doc.visibility]))[0]
    for q in range(len(doc)):
        visible = [k for k in range(len(doc)) if mask[q, k]]
        seen = [(doc.input_ids[k], doc.position_ids[k]) for k in visible]
        expanded = turn0 if q < 12 else turn1
        qe = doc.position_ids[q]  # its index in the expanded sequence
        assert expanded.input_ids[qe] == doc.input_ids[q]
        assert seen == [(expanded.input_ids[k], k) for k in range(qe + 1)]


def _arith_chats(turns, n, seed, system=None):
    rows = generate(ArithmeticSpec(turns=turns, verbosity=0.5), n, seed=seed)
    for row in rows:
        if system:
            row["messages"] = [{"role": "system", "content": system}, *row["messages"]]
    return rows


@pytest.mark.parametrize("system", [None, "You are a helpful assistant."])
def test_one_turn_chat_is_ordinary_packed_sft(tiny_tokenizer, system):
    rows = _arith_chats(1, 3, seed=3, system=system)
    no_reasoning = {"id": "plain", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    trailing_user = {"id": "trail", "messages": [*rows[0]["messages"], {"role": "user", "content": "thanks"}]}
    for row in [*rows, no_reasoning, trailing_user]:
        ids, loss = chat_ids(tiny_tokenizer, row["messages"])
        ordinary = Document(ids, loss, sample_id=row["id"])
        assert document_from_messages(tiny_tokenizer, row["messages"], row["id"]) == ordinary
        for mode in ("single_pass", "per_turn"):
            assert chat_documents(tiny_tokenizer, row["messages"], mode, row["id"]) == [ordinary]


def _turn_pieces(doc):
    """(prompt ids, response ids) of every turn, read back from the span description: turn k's prompt is the
    context chain X_0..X_k (even segments), its response the loss tokens of turn k."""
    turns, pieces = token_turns(doc), []
    for k in range(max(turns) + 1):
        response_start = next(i for i, (turn, loss) in enumerate(zip(turns, doc.loss_mask)) if turn == k and loss)
        chain = [i for i, s in enumerate(doc.segment_ids) if s % 2 == 0 and s <= 2 * k and i < response_start]
        prompt = [doc.input_ids[i] for i in chain]
        response = [t for t, turn, loss in zip(doc.input_ids, turns, doc.loss_mask) if turn == k and loss]
        pieces.append((prompt, response))
    return pieces


def test_multi_turn_tokens_agree_with_generation_prompt(tiny_tokenizer):
    """Turn k's context chain = whole-text tokenization of its generation prompt; its response = SFT tokens."""
    encode = lambda text: tiny_tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    for row in _arith_chats(4, 3, seed=4, system="Be brief."):
        messages = row["messages"]
        pieces = _turn_pieces(document_from_messages(tiny_tokenizer, messages, row["id"]))
        assistant_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        assert len(pieces) == len(assistant_at) == 4
        for (prompt, response), i in zip(pieces, assistant_at):
            assert prompt == encode(generation_prompt(tiny_tokenizer, messages[:i]))
            reasoning, answer = split_reasoning(messages[i])
            think = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n"
            assert response == encode(think) + encode(f"{answer}{IM_END}")


def test_rl_entry_point_from_token_ids_matches_the_chat_builder(tiny_tokenizer):
    messages = _arith_chats(3, 1, seed=5)[0]["messages"]
    encode = lambda text: tiny_tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assistant_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    prompts = [encode(generation_prompt(tiny_tokenizer, messages[:i])) for i in assistant_at]
    responses = []
    for i in assistant_at:
        reasoning, answer = split_reasoning(messages[i])
        responses.append(encode(f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n") + encode(f"{answer}{IM_END}"))
    rollout = document_from_prompts(prompts, responses, sample_id="r")
    chat = document_from_messages(tiny_tokenizer, messages, "r")
    # the same layout, less the chat's closing "\n" (a rollout ends at <|im_end|>)
    assert rollout.input_ids == chat.input_ids[:-1] and rollout.position_ids == chat.position_ids[:-1]
    assert rollout.segment_ids == chat.segment_ids[:-1] and rollout.visibility == chat.visibility
    assert rollout.loss_mask == chat.loss_mask[:-1]
    # RL: the loss tokens are the generated tokens of all turns in order (old log-probs line up with them)
    assert [t for t, loss in zip(rollout.input_ids, rollout.loss_mask) if loss] == [t for r in responses for t in r]
    # a per-token response mask (e.g. a truncated turn left out of the loss)
    keep = [[True] * len(responses[0]), [False] * len(responses[1]), [True] * len(responses[2])]
    masked = document_from_prompts(prompts, responses, keep)
    assert sum(masked.loss_mask) == len(responses[0]) + len(responses[2])
    with pytest.raises(ValueError, match="prompt of turn 1 does not extend the prompt of turn 0"):
        document_from_prompts([prompts[0], prompts[1][1:]], responses[:2], sample_id="r")


def test_build_document_rejects_an_empty_context():
    with pytest.raises(ValueError, match="turn 1 has an empty context"):
        build_document([[1, 2], []], [[3], [4]])
    with pytest.raises(ValueError, match="turn 0 has an empty response"):
        build_document([[1]], [[]])


@pytest.mark.parametrize(
    "messages, reason",
    [
        (
            [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}],
            r"messages\[0\]\.role: assistant message without a user message before it",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
            r"messages\[2\]\.role: assistant turn without a user turn since the previous assistant turn",
        ),
        (
            [{"role": "user", "content": "q", "reasoning_content": "hmm"}, {"role": "assistant", "content": "a"}],
            r"messages\[0\]\.reasoning_content: reasoning on a user message",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "reasoning_content": "r", "content": " "}],
            r"messages\[1\]\.content: empty answer",
        ),
    ],
)
def test_malformed_chats_are_rejected_with_index_and_reason(tiny_tokenizer, messages, reason):
    for mode in ("single_pass", "per_turn"):
        with pytest.raises(MultiTurnChatError, match=r"chat 7 \(id 'bad'\): " + reason):
            chat_documents(tiny_tokenizer, messages, mode, "bad", chat_index=7)


def test_mode_and_backend_checks():
    check_mode("single_pass", "sdpa")
    check_mode("per_turn", "flash")
    check_mode("single_pass", "flash", max_turns=1)
    with pytest.raises(ValueError, match="data.multi_turn=single_pass needs an arbitrary attention mask"):
        check_mode("single_pass", "flash")
    with pytest.raises(ValueError, match="data.multi_turn='both' is not one of"):
        check_mode("both", "sdpa")
