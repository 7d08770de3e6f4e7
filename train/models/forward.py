"""The forward pass shared by SFT and RL: per-token log-probs (and entropy) on packed rows.

Position t's logits predict token t+1, so every returned tensor is [rows, seq - 1] and aligned with
``batch.input_ids[:, 1:]`` / ``batch.labels[:, 1:]``.

Attention models read the span description through the attention backend (train/models/attention.py). State-space
models (Mamba-2) have no attention mask: their kernels keep packed documents apart with ``seq_idx`` (the
mamba_ssm / causal_conv1d CUDA kernels). The torch reference implementation (CPU, or no kernels installed)
cannot reset its state at document boundaries, so there each document runs in its own right-padded row and
the logits are put back in the packed layout: the caller sees the same batch and the same numbers either way.

Long rows (``trainer.logits_chunk_tokens``): the forward runs the model's backbone to its last hidden states and the
output head chunk by chunk over tokens (train/models/tiled_logits.py), so the full tokens x vocabulary logits are
never held, in the forward or the backward. The setting travels on the model (``set_logits_chunk_tokens``), so
every forward of that model (update, pi_old, reference) takes it; null keeps the full-logits path.

``trainer.compile`` (train/models/compiled.py): the model's forward and the log-softmax over its logits run compiled.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F

from data_pipelines.packing import IGNORE_INDEX, PackedBatch, one_document_per_row
from data_pipelines.shared_prompt import SharedPromptBatch
from train.models import sequence_parallel
from train.models.attention import model_inputs
from train.models.compiled import head_logprobs
from train.models.model_zoo import ATTENTION_FREE
from train.models.tiled_logits import chunked_token_logprobs

log = logging.getLogger(__name__)

PADDED_FALLBACK_MESSAGE = (
    "Mamba-2 on CPU: packing disabled, padded batches (the torch reference kernel cannot reset state at "
    "document boundaries)"
)
_padded_fallback_logged = False  # the message above is logged once per process
CHUNK_ATTRIBUTE = "logits_chunk_tokens"  # set on the model by set_logits_chunk_tokens


def _core(model):
    """The Hugging Face causal LM under a DeepSpeed engine (``.module``) and peft's wrapper (LoRA layers stay in it)."""
    core = getattr(model, "module", model)
    return core.get_base_model() if hasattr(core, "get_base_model") else core


def attn_implementation(model) -> str | None:
    """The transformers attention implementation ``model`` (a DeepSpeed engine, peft or HF model) runs under."""
    return getattr(_core(model).config, "_attn_implementation", None)


def set_logits_chunk_tokens(model, chunk_tokens: int | None) -> None:
    """Make every ``token_logprobs`` of ``model`` (a DeepSpeed engine or an HF model) compute its logits in chunks
    of ``chunk_tokens`` tokens (``trainer.logits_chunk_tokens``); None: the full logits."""
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or int(chunk_tokens) != chunk_tokens or chunk_tokens < 1):
        raise ValueError(f"trainer.logits_chunk_tokens={chunk_tokens} must be an integer >= 1 or null (full logits)")
    setattr(getattr(model, "module", model), CHUNK_ATTRIBUTE, None if chunk_tokens is None else int(chunk_tokens))


def logits_chunk_tokens(model) -> int | None:
    """The chunk size ``set_logits_chunk_tokens`` gave ``model``; None (full logits) by default."""
    return getattr(getattr(model, "module", model), CHUNK_ATTRIBUTE, None)


def is_ssm(model) -> bool:
    """Whether ``model`` (or the module a DeepSpeed engine wraps) is an attention-free state-space LM."""
    return getattr(getattr(model, "module", model).config, "model_type", None) in ATTENTION_FREE


def ssm_kernels_available(device: torch.device) -> bool:
    """Mamba-2 CUDA kernels that take ``seq_idx``: mamba_ssm (SSD scan) and causal_conv1d, on a GPU."""
    return device.type == "cuda" and all(importlib.util.find_spec(p) is not None for p in ("mamba_ssm", "causal_conv1d"))


def ssm_logits(model, batch: PackedBatch, hidden: bool = False) -> torch.Tensor:
    """Logits [rows, seq, vocab] of a Mamba-2 model on packed rows, documents kept apart; with ``hidden``, the
    backbone's last hidden states [rows, seq, d] instead (zeros on the tail padding in the fallback)."""
    if not batch.plain:
        raise ValueError(
            "Mamba-2 has no attention mask, so it cannot run single-pass multi-turn documents (per-turn visibility); "
            "set data.multi_turn=per_turn"
        )
    core = getattr(model, "module", model)  # DeepSpeed engine -> the HF model
    if ssm_kernels_available(batch.input_ids.device):
        # GPU kernels reset the state where seq_idx changes (one index per document, the tail padding its own).
        # Mamba2ForCausalLM.forward does not pass seq_idx on (transformers 5.23), so call backbone + head.
        # Not exercised by the CPU test suite.
        seq_idx = torch.where(batch.doc_ids >= 0, batch.doc_ids, len(batch.sample_ids)).to(torch.int32)  # [rows, seq]
        states = core.backbone(input_ids=batch.input_ids, seq_idx=seq_idx, use_cache=False).last_hidden_state
        return states if hidden else core.lm_head(states.to(core.lm_head.weight.dtype)).float()
    global _padded_fallback_logged
    if not _padded_fallback_logged:
        log.warning(PADDED_FALLBACK_MESSAGE)
        _padded_fallback_logged = True
    pad_id = core.config.pad_token_id if core.config.pad_token_id is not None else 0
    padded, source = one_document_per_row(batch, pad_id)  # [docs, width]
    on_token = source >= 0
    if hidden:  # Mamba2ForCausalLM.forward = backbone + lm_head
        logits = _core(model).backbone(input_ids=padded.input_ids, attention_mask=on_token.long(),
                                       use_cache=False).last_hidden_state  # [docs, width, d]
    else:
        logits = model(input_ids=padded.input_ids, attention_mask=on_token.long(), use_cache=False).logits  # [docs, width, vocab]
    rows, seq = batch.input_ids.shape
    packed = logits.new_zeros(rows * seq, logits.size(-1))
    packed[source[on_token]] = logits[on_token]
    return packed.view(rows, seq, -1)  # [rows, seq, vocab] (or d), zeros on the tail padding


def causal_lm_logits(model, batch: PackedBatch, backend: str) -> torch.Tensor:
    """Logits [rows, seq, vocab] on packed rows, attention never crossing documents (state never, for SSMs)."""
    if is_ssm(model):
        return ssm_logits(model, batch)
    return model(**model_inputs(batch, backend, attn_implementation(model)), use_cache=False).logits


def causal_lm_hidden(model, batch: PackedBatch, backend: str) -> torch.Tensor:
    """The last hidden states [rows, seq, d] that ``causal_lm_logits`` turns into logits (the output head's input)."""
    if is_ssm(model):
        return ssm_logits(model, batch, hidden=True)
    inputs = model_inputs(batch, backend, attn_implementation(model))
    return _core(model).get_decoder()(**inputs, use_cache=False).last_hidden_state


def shared_prompt_logits(model, batch: SharedPromptBatch, hidden: bool = False) -> torch.Tensor:
    """Logits [responses, R, vocab] of a SharedPromptBatch (data_pipelines/shared_prompt.py): position j
    predicts response token j. The prompts run once with a KV cache; each response runs on a copy of its
    prompt's keys and values (indexing keeps the autograd graph, so gradients flow back into the prompt pass).
    With ``hidden``: the backbone's last hidden states [responses, R, d] instead (the output head's input)."""
    from transformers import DynamicCache

    device = batch.prompt_ids.device
    num_prompts, width_p = batch.prompt_ids.shape
    width_r = batch.response_ids.shape[1]
    prompt_mask = (torch.arange(width_p, device=device) < batch.prompt_lengths[:, None]).long()  # [prompts, P]
    cache = DynamicCache()
    run = _core(model).get_decoder() if hidden else model

    def states(out):
        return out.last_hidden_state if hidden else out.logits

    out = run(input_ids=batch.prompt_ids, attention_mask=prompt_mask, past_key_values=cache, use_cache=True,
                position_ids=torch.arange(width_p, device=device).expand(num_prompts, -1))
    last = states(out)[torch.arange(num_prompts, device=device), batch.prompt_lengths - 1]  # [prompts, vocab]
    cache = out.past_key_values
    cache.batch_select_indices(batch.owner)  # [responses, heads, P, head_dim] per layer
    response_mask = (torch.arange(width_r, device=device) < batch.response_lengths[:, None]).long()
    positions = batch.prompt_lengths[batch.owner, None] + torch.arange(width_r, device=device)  # [responses, R]
    logits = states(run(input_ids=batch.response_ids, attention_mask=torch.cat([prompt_mask[batch.owner], response_mask], 1),
                        position_ids=positions, past_key_values=cache, use_cache=True))  # [responses, R, vocab or d]
    return torch.cat([last[batch.owner, None], logits[:, :-1]], dim=1)


def token_logprobs(
    model, batch: PackedBatch | SharedPromptBatch, backend: str, temperature: float = 1.0, with_entropy: bool = False,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(x_{t+1} | x_{<=t}) for every position, [rows, seq-1]; entropy of pi(.|x_{<=t}) if asked.
    For a SharedPromptBatch: log pi(y_j | prompt, y_{<j}) for every response token, [responses, R].
    ``chunk_tokens`` (default: the model's ``set_logits_chunk_tokens``): the output head and softmax run on that many
    tokens at a time (train/models/tiled_logits.py); None: on the full logits."""
    chunk_tokens = chunk_tokens if chunk_tokens is not None else logits_chunk_tokens(model)
    if isinstance(batch, SharedPromptBatch):
        if sequence_parallel.of(model) is not None:
            raise ValueError("trainer.share_prompt runs whole sequences; with trainer.sequence_parallel_size > 1 set "
                             "trainer.share_prompt=false")
        if backend != "sdpa":  # the response pass reads a right-padded prompt cache through a 2D padding mask
            raise ValueError(f"trainer.share_prompt runs under model.attn_backend=sdpa only, got {backend}; "
                             "set trainer.share_prompt=auto or false")
        targets = batch.response_ids
        if chunk_tokens is not None:
            hidden = shared_prompt_logits(model, batch, hidden=True)  # [responses, R, d]
            return _chunked(model, hidden, targets, chunk_tokens, temperature, with_entropy)
        logits = shared_prompt_logits(model, batch)  # [responses, R, vocab]
    elif (sp := sequence_parallel.of(model)) is not None:  # this rank's slice of every row (Ulysses SP)
        inputs, targets = sp.inputs(batch)  # targets [rows, L], shifted over the whole row before slicing
        if chunk_tokens is not None:
            hidden = _core(model).get_decoder()(**inputs, use_cache=False).last_hidden_state  # [rows, L, d]
            logprobs, entropy = _chunked(model, hidden, targets, chunk_tokens, temperature, with_entropy)
        else:
            logprobs, entropy = head_logprobs(model)(model(**inputs, use_cache=False).logits, targets, temperature, with_entropy)
        seq = batch.input_ids.shape[1]  # whole rows again: [rows, seq-1]
        return sp.gather(logprobs, seq), (sp.gather(entropy, seq) if entropy is not None else None)
    else:
        targets = batch.input_ids[:, 1:]  # [rows, seq-1]
        if chunk_tokens is not None:
            hidden = causal_lm_hidden(model, batch, backend)[:, :-1]  # [rows, seq-1, d]
            return _chunked(model, hidden, targets, chunk_tokens, temperature, with_entropy)
        logits = causal_lm_logits(model, batch, backend)[:, :-1]  # [rows, seq-1, vocab]
    # the entropy is differentiable (the RL entropy bonus); a diagnostic otherwise. trainer.compile: fused
    return head_logprobs(model)(logits, targets, temperature, with_entropy)


def _chunked(model, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int, temperature: float,
             with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = _core(model).get_output_embeddings()
    return chunked_token_logprobs(hidden.to(head.weight.dtype), head, targets, chunk_tokens, temperature, with_entropy)


def sft_loss_sum(model, batch: PackedBatch, backend: str, chunk_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over loss tokens, number of loss tokens). Divide by the total over the
    accumulation window so that gradient accumulation equals one large batch. ``chunk_tokens`` (default: the
    model's setting): the cross-entropy from chunked log-probs (``token_logprobs``), never the full logits."""
    targets = batch.labels[:, 1:]
    chunk_tokens = chunk_tokens if chunk_tokens is not None else logits_chunk_tokens(model)
    if chunk_tokens is not None:
        logprobs, _ = token_logprobs(model, batch, backend, chunk_tokens=chunk_tokens)
        trained = targets != IGNORE_INDEX
        return -logprobs[trained].sum(), int(trained.sum())
    logits = causal_lm_logits(model, batch, backend)[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


def per_document(values: torch.Tensor, batch: PackedBatch | SharedPromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the loss-token entries of ``values`` [rows, seq-1] into one row per document.

    Returns (``out`` [num_docs, max_loss_tokens], ``mask`` [num_docs, max_loss_tokens]) in the order of
    ``batch.sample_ids``, so that per-sequence losses (algorithms/) can run on packed rows: position t of a
    row predicts token t+1, which belongs to document ``doc_ids[:, t+1]``. A SharedPromptBatch's values are
    already one row per response: its loss tokens move to the front of each row, in order.
    """
    if isinstance(batch, SharedPromptBatch):
        trained = batch.loss_mask  # [responses, R]
        counts = trained.sum(1)
        width = int(counts.max()) if len(counts) else 0
        index = torch.argsort((~trained).to(torch.int8), dim=1, stable=True)[:, :width]  # loss positions first, in order
        mask = torch.arange(width, device=values.device) < counts[:, None]
        return values.gather(1, index).masked_fill(~mask, 0), mask
    trained = batch.labels[:, 1:] != IGNORE_INDEX  # [rows, seq-1]
    doc = batch.doc_ids[:, 1:][trained]  # [n] document of each trained position, row-major = sequence order
    picked = values[trained]  # [n]
    num_docs = len(batch.sample_ids)
    counts = torch.bincount(doc, minlength=num_docs)  # [docs]
    width = int(counts.max()) if len(counts) else 0
    order = torch.argsort(doc, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(doc), device=values.device) - starts[doc[order]]
    out = values.new_zeros(num_docs, width)
    mask = torch.zeros(num_docs, width, dtype=torch.bool, device=values.device)
    out[doc[order], slot] = picked[order]
    mask[doc[order], slot] = True
    return out, mask
