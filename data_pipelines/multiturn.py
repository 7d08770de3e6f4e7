"""Single-pass multi-turn reasoning chats: one sequence and one span description per chat (methods.md §4).

At inference, turn k of a reasoning chat sees the earlier answers but not the earlier reasoning. The usual
training expands a K-turn chat into K sequences (turn k = its generation prompt + its response), re-processing
the shared prefix K times. Here the chat becomes ONE ``Document``: each earlier answer appears twice, once in
its response (with the loss) and once as the reasoning-free copy that later turns see. With ``X_k`` the context
that turn k adds and ``R_k`` turn k's response (reasoning + answer + ``<|im_end|>``, with loss)::

    X_0 = [system][user_0]<|im_start|>assistant\\n
    R_0 =                 <think>\\n..\\n</think>\\n\\n answer_0<|im_end|>              (loss)
    X_1 =                 answer_0<|im_end|>\\n [user_1]<|im_start|>assistant\\n     (copy + next prompt)
    R_1 = ...
    X_{K-1} R_{K-1} \\n                                                          (last turn, one segment)

so the inference prompt of turn k is X_0 + ... + X_k, exactly ``generation_prompt`` of that turn. (Shown in
ChatML; with any chat template, X_k is turn k's generation prompt minus turn k-1's, token for token. That needs
a template that drops earlier reasoning from the history and renders it the same way in every later prompt, as
Qwen3's and the embedded ChatML do; other templates are refused naming the model, ``check_drops_reasoning``.)

Span description (read by every attention backend, train/models/attention.py):
- segments: X_k is local segment 2k and R_k is 2k+1 for k < K-1; the last turn's X and R share segment
  2K-2 (nothing comes after it), so a one-turn chat is ordinary packed SFT, and ``segment // 2`` is the turn
  of every token (``token_turns``);
- visibility: X_k sees X_0..X_k; R_k sees X_0..X_k and itself; nothing sees an earlier R (earlier reasoning,
  or the with-reasoning copy of an answer);
- positions: X segments count on without gaps; R_k starts where X_{k+1} starts (at inference the reasoning-
  free answer takes the place where the response was generated). Every token thus has the position, and sees
  the tokens, that it has in the expanded sequence of the turn that owns it.

Labels (HF shift: the token before a loss token predicts it): the token before R_k's first token is the last
token of X_k (the assistant header), and each later R_k token follows one of R_k, so every prediction is made
from the same token, context and position as in turn k's expanded sequence. X_k must therefore be non-empty.
Loss and gradients equal those of the per-turn expansion (tests/data_pipelines/test_multiturn_equivalence.py).

Entry points: ``document_from_messages`` (SFT, from a chat), ``document_from_prompts`` (RL, from per-turn
prompt ids and generated response ids), ``build_document`` (the layout itself, from per-turn token pieces);
``per_turn_documents`` is the expansion baseline; ``chat_documents`` picks one by ``data.multi_turn``.
"""

from __future__ import annotations

from collections.abc import Sequence

from data_pipelines.chat_format import assistant_turns, check_drops_reasoning, encode
from data_pipelines.packing import Document
from data_pipelines.validation import DataValidationError, row_problems

MODES = ("single_pass", "per_turn")


# ---------------------------------------------------------------------------------------------- layout


def build_document(
    contexts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    response_loss: Sequence[Sequence[bool]] | None = None,
    tail: Sequence[int] = (),
    sample_id: str = "",
) -> Document:
    """The single-pass Document of a K-turn chat from its token pieces.

    contexts[k]: tokens turn k adds to the prompt (k > 0: the reasoning-free copy of answer k-1, then the new
    user turn and the assistant header); responses[k]: turn k's reasoning + answer tokens (loss on all of them,
    or where ``response_loss[k]`` is True); tail: tokens after the last response (no loss, seen by nobody).
    """
    num_turns = len(responses)
    where = f"chat {sample_id!r}" if sample_id else "chat"
    if num_turns == 0:
        raise ValueError(f"{where}: no turns; a multi-turn document needs at least one response")
    if len(contexts) != num_turns:
        raise ValueError(f"{where}: {len(contexts)} contexts for {num_turns} responses; give one context per turn")
    if response_loss is None:
        response_loss = [[True] * len(r) for r in responses]
    input_ids, loss_mask, position_ids, segment_ids = [], [], [], []
    position = 0  # next position on the context chain (the per-turn prompt view)
    for k in range(num_turns):
        context, response, loss = list(contexts[k]), list(responses[k]), list(response_loss[k])
        if not context:
            raise ValueError(
                f"{where}: turn {k} has an empty context; the token before a response must be its own turn's "
                "prompt (at least the assistant header), or the shifted labels would be predicted from another turn"
            )
        if not response:
            raise ValueError(f"{where}: turn {k} has an empty response")
        if len(loss) != len(response):
            raise ValueError(f"{where}: turn {k}: response_loss has {len(loss)} entries for {len(response)} tokens")
        last = k == num_turns - 1
        context_segment = 2 * k
        response_segment = context_segment if last else context_segment + 1
        input_ids += context
        loss_mask += [False] * len(context)
        position_ids += range(position, position + len(context))
        segment_ids += [context_segment] * len(context)
        position += len(context)
        body = response + (list(tail) if last else [])
        input_ids += body
        loss_mask += loss + [False] * (len(body) - len(response))
        position_ids += range(position, position + len(body))  # the next context restarts here
        segment_ids += [response_segment] * len(body)
    num_segments = 2 * num_turns - 1
    visibility = [[False] * num_segments for _ in range(num_segments)]  # [segments, segments]
    for a in range(num_segments):
        turn = a // 2
        for k in range(turn + 1):
            visibility[a][2 * k] = True  # the context chain X_0..X_turn
        visibility[a][a] = True  # a response sees itself (a context sees itself via the chain)
    return Document(input_ids, loss_mask, position_ids, segment_ids, visibility, sample_id=sample_id)


def token_turns(document: Document) -> list[int]:
    """Turn index of every token of a single-pass Document (context tokens count for the turn they prompt)."""
    return [segment // 2 for segment in document.segment_ids]


def document_from_prompts(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    response_loss: Sequence[Sequence[bool]] | None = None,
    sample_id: str = "",
    tail: Sequence[int] = (),
) -> Document:
    """Single-pass Document of a multi-turn rollout (RL) or chat (SFT): ``prompts[k]`` is the full prompt the model
    was given at turn k (earlier reasoning dropped, earlier answers kept), ``responses[k]`` the ids it generated,
    ``tail`` what follows the last response (no loss).

    Each prompt must extend the previous one: that is what makes one pass equal the per-turn passes."""
    if len(prompts) != len(responses):
        raise ValueError(f"rollout {sample_id!r}: {len(prompts)} prompts for {len(responses)} responses")
    contexts, previous = [], []
    for k, prompt in enumerate(prompts):
        prompt = list(prompt)
        if prompt[: len(previous)] != previous or len(prompt) == len(previous):
            raise ValueError(
                f"rollout {sample_id!r}: the prompt of turn {k} does not extend the prompt of turn {k - 1}; single-"
                "pass training needs each turn's prompt to be the previous prompt + (reasoning-free answer, next "
                "user turn, assistant header) token for token; build the prompts by appending ids, or use "
                "data.multi_turn=per_turn"
            )
        contexts.append(prompt[len(previous) :])
        previous = prompt
    return build_document(contexts, responses, response_loss, tail=tail, sample_id=sample_id)


# ------------------------------------------------------------------------------------------ from chats


class MultiTurnChatError(DataValidationError):
    pass


def chat_problems(messages) -> list[tuple[str, str]]:
    """(field, reason) for everything that keeps ``messages`` from being a multi-turn reasoning chat."""
    problems = row_problems({"messages": messages}, require_assistant=True)
    if problems:
        return problems
    user_since_answer, seen_assistant = False, False
    for i, message in enumerate(messages):
        if message["role"] == "user":
            user_since_answer = True
        elif message["role"] == "assistant":
            if seen_assistant and not user_since_answer:
                reason = "assistant turn without a user turn since the previous assistant turn"
                problems.append((f"messages[{i}].role", reason))
            user_since_answer, seen_assistant = False, True
    return problems


def check_chat(messages, chat_index: int, sample_id: str = "") -> None:
    """Raise MultiTurnChatError naming the chat index, id, field and reason if the chat is malformed."""
    problems = chat_problems(messages)
    if problems:
        reasons = "; ".join(f"{field}: {reason}" for field, reason in problems)
        raise MultiTurnChatError(f"chat {chat_index} (id {sample_id!r}): {reasons}")


def chat_pieces(tokenizer, messages: list[dict], chat_index: int = 0, sample_id: str = ""):
    """(prompts, responses, tail) token ids of a validated chat, rendered by the tokenizer's chat template:
    per assistant turn its generation prompt and the response the model generates (data_pipelines/chat_format.py),
    and what the template renders after the last response."""
    check_chat(messages, chat_index, sample_id)
    turns = assistant_turns(tokenizer, messages)
    prompts = [encode(tokenizer, turn.prompt) for turn in turns]
    responses = [encode(tokenizer, turn.response) for turn in turns]
    return prompts, responses, encode(tokenizer, turns[-1].after)


def document_from_messages(tokenizer, messages: list[dict], sample_id: str = "", chat_index: int = 0) -> Document:
    """Single-pass Document of a reasoning chat (SFT). A one-turn chat gives the ordinary SFT Document.

    More than one turn needs a template that drops earlier reasoning (refused otherwise, naming the model)."""
    prompts, responses, tail = chat_pieces(tokenizer, messages, chat_index, sample_id)
    if len(responses) > 1:
        check_drops_reasoning(tokenizer, "data.multi_turn=single_pass", "data.multi_turn=per_turn")
    return document_from_prompts(prompts, responses, sample_id=sample_id, tail=tail)


def per_turn_documents(tokenizer, messages: list[dict], sample_id: str = "", chat_index: int = 0) -> list[Document]:
    """The expansion baseline: one plain Document per turn (its generation prompt + its response with loss)."""
    prompts, responses, tail = chat_pieces(tokenizer, messages, chat_index, sample_id)
    documents = []
    for k, (prompt, response) in enumerate(zip(prompts, responses)):
        after = tail if k == len(responses) - 1 else []
        ids = prompt + response + after
        loss = [False] * len(prompt) + [True] * len(response) + [False] * len(after)
        documents.append(Document(ids, loss, sample_id=sample_id if len(responses) == 1 else f"{sample_id}/turn{k}"))
    return documents


def chat_documents(tokenizer, messages: list[dict], mode: str, sample_id: str = "", chat_index: int = 0) -> list[Document]:
    """Documents of one chat for ``data.multi_turn=mode``: [single-pass Document] or one Document per turn."""
    if mode == "single_pass":
        return [document_from_messages(tokenizer, messages, sample_id, chat_index)]
    if mode == "per_turn":
        return per_turn_documents(tokenizer, messages, sample_id, chat_index)
    raise ValueError(f"data.multi_turn={mode!r} is not one of {list(MODES)}")


def check_mode(mode: str, attn_backend: str, max_turns: int = 2) -> None:
    """Raise early if ``data.multi_turn`` cannot run on ``model.attn_backend`` for chats of up to ``max_turns``
    turns (one-turn chats are plain packing in both modes, so flash runs them)."""
    if mode not in MODES:
        raise ValueError(f"data.multi_turn={mode!r} is not one of {list(MODES)}")
    if mode == "single_pass" and attn_backend == "flash" and max_turns > 1:
        raise ValueError(
            "data.multi_turn=single_pass needs an arbitrary attention mask, which flash-attn varlen cannot take: "
            "use model.attn_backend=flex (GPU) or sdpa, or data.multi_turn=per_turn with flash"
        )
