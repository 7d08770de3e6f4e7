"""Single-pass multi-turn rows give the loss and every parameter gradient of the per-turn expansion.

The reference is built independently of data_pipelines/multiturn.py and of the packing/mask code: turn k is
the whole-text tokenization of ``generation_prompt`` (earlier reasoning dropped) followed by turn k's
reasoning + answer, run alone through the model with its default causal attention; the loss is the sum of
token cross-entropies over all turns divided by the number of trained tokens, as ``sft_loss_sum`` normalises.
"""

import importlib.util
import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from data_pipelines.arithmetic import ArithmeticSpec, generate
from data_pipelines.chat_format import IM_END, THINK_CLOSE, THINK_OPEN, generation_prompt, split_reasoning
from data_pipelines.multiturn import document_from_messages, per_turn_documents
from data_pipelines.packing import collate
from tests.conftest import TEST_ARCH
from train.models.forward import sft_loss_sum
from train.models.model_zoo import ATTN_IMPLEMENTATIONS, build_tiny_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# FlexAttention has no backward on CPU (torch 2.13): forward-only there.
HAS_BACKWARD = {"sdpa": True, "flex": DEVICE.type == "cuda", "flash": True}
# Every flex batch gets this one shape: each new shape costs a compile (seconds on CPU), and the recompile
# with dynamic shapes that torch makes after a shape change fails in the CPU flex template of torch 2.13
# (CppCompileError 'cur_kvSplitSize4'); one static shape sidesteps both.
FLEX_SEQ, FLEX_SEGMENTS = 1280, 16


@pytest.fixture(scope="module", autouse=True)
def fresh_compile_cache():
    """Compile flex for this module's one shape, and leave no compiled shapes behind for other modules."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _available(backend):
    if backend == "flash":
        return DEVICE.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    return True


def _random_rows(seed):
    """1 to 3 chats of 1 to 5 turns per row (a 5-turn and a 1-turn chat in every case), two rows."""
    rng = random.Random(seed)
    layout = [[rng.randint(1, 5) for _ in range(rng.randint(1, 3))] for _ in range(2)]
    layout[0][0], layout[-1][-1] = 5, 1
    rows = []
    for r, turns_per_chat in enumerate(layout):
        chats = []
        for c, turns in enumerate(turns_per_chat):
            spec = ArithmeticSpec(digits=rng.randint(1, 2), verbosity=rng.random(), turns=turns, word_problems=rng.random() < 0.5)
            chat = generate(spec, 1, seed=1000 * seed + 10 * r + c, prefix=f"r{r}c{c}")[0]
            if rng.random() < 0.5:
                chat["messages"] = [{"role": "system", "content": "Think step by step."}, *chat["messages"]]
            chats.append(chat)
        rows.append(chats)
    return rows


def _reference_loss(model, tokenizer, chats):
    """Per-turn expansion, one sequence per turn, no packing and no custom mask."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    total, count = 0.0, 0
    for chat in chats:
        messages = chat["messages"]
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = encode(generation_prompt(tokenizer, messages[:i]))
            reasoning, answer = split_reasoning(message)
            response = encode(f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n") + encode(f"{answer}{IM_END}")
            ids = torch.tensor([prompt + response], device=DEVICE)
            logits = model(input_ids=ids, use_cache=False).logits[0].float()  # [seq, vocab]
            predicting = logits[len(prompt) - 1 : -1]  # position t predicts token t+1
            total = total + F.cross_entropy(predicting, ids[0, len(prompt) :], reduction="sum")
            count += len(response)
    return total / count


def _sharp_model(tokenizer, model_type, seed):
    """A random tiny model whose attention is sharp: at the default init (std 0.02) attention is nearly uniform,
    so a wrong position id or a leaked reasoning token would change the loss by only ~1e-7."""
    model = build_tiny_model(tokenizer, {**TEST_ARCH, "model_type": model_type}, seed=seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(20.0)
    return model


def _pad_segments(batch, num_segments):
    """The same batch with a larger segment table (the extra segments hold no tokens)."""
    rows, used, _ = batch.visibility.shape
    assert used <= num_segments and batch.input_ids.shape[1] == FLEX_SEQ, "raise FLEX_SEQ / FLEX_SEGMENTS"
    visibility = torch.zeros(rows, num_segments, num_segments, dtype=torch.bool)  # [rows, segments, segments]
    visibility[:, :used, :used] = batch.visibility
    return replace(batch, visibility=visibility)


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash"])
@pytest.mark.parametrize("seed, model_type", [(0, "qwen2"), (1, "llama"), (2, "qwen2")])
def test_single_pass_equals_per_turn_expansion(tiny_tokenizer, backend, seed, model_type):
    if not _available(backend):
        pytest.skip(f"{backend} needs a CUDA GPU with flash-attn")
    model = _sharp_model(tiny_tokenizer, model_type, seed).to(DEVICE)
    rows = _random_rows(seed)
    chats = [chat for row in rows for chat in row]
    backward = HAS_BACKWARD[backend]

    model.config._attn_implementation = "sdpa"
    model.zero_grad()
    with torch.set_grad_enabled(backward):
        reference = _reference_loss(model, tiny_tokenizer, chats)
    if backward:
        reference.backward()
        reference_grads = _grads(model)

    model.config._attn_implementation = ATTN_IMPLEMENTATIONS[backend]
    single_pass = [[document_from_messages(tiny_tokenizer, c["messages"], c["id"]) for c in row] for row in rows]
    per_turn = [[d for c in row for d in per_turn_documents(tiny_tokenizer, c["messages"], c["id"])] for row in rows]
    # flash-attn varlen runs plain packing only: the per-turn expansion, packed without duplication
    layouts = {"per_turn": per_turn} if backend == "flash" else {"single_pass": single_pass, "per_turn": per_turn}
    for name, documents in layouts.items():
        batch = collate(documents, tiny_tokenizer.pad_token_id, pad_to=FLEX_SEQ if backend == "flex" else None)
        if backend == "flex":
            batch = _pad_segments(batch, FLEX_SEGMENTS)
        batch = batch.to(DEVICE)
        assert batch.plain == (name == "per_turn")
        model.zero_grad()
        with torch.set_grad_enabled(backward):
            loss_sum, count = sft_loss_sum(model, batch, backend)
            loss = loss_sum / count
        assert abs(loss.item() - reference.item()) <= 1e-5 * abs(reference.item()), (name, loss.item(), reference.item())
        if not backward:
            continue
        loss.backward()
        for param_name, grad in _grads(model).items():
            expected = reference_grads[param_name]
            error = (grad - expected).norm() / expected.norm()
            assert error < 1e-5, f"{name}: {param_name}: relative gradient error {error:.2e}"
