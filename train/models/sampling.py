"""Batched sampling for RL rollouts on a Hugging Face causal LM with a KV cache (the `hf` rollout backend).

Same distribution as ``model.generate(do_sample=True, temperature=T, top_p=p, top_k=0)``, less work per token:

- rows that have produced eos leave the batch (their KV-cache rows are dropped once a quarter of the batch has
  finished), so the step cost follows the rows still generating instead of the longest one;
- the prompt is computed once for its ``group_size`` samples (its KV-cache rows are then repeated);
- the KV cache is allocated once for prompt + budget and filled in place (train/models/preallocated_cache.py),
  where Hugging Face's dynamic cache copies itself with ``torch.cat`` at every token;
- a token is drawn by inverse-CDF sampling, one uniform number per row (``torch.multinomial`` draws one
  exponential per vocabulary entry), from a ``torch.Generator`` seeded per call.

Attention-free models (Mamba-2) have no KV cache: ``sample`` hands them to train/models/ssm_decode.py, the same
loop on their constant-size recurrent state.

Greedy decoding (temperature 0) takes the argmax and gives exactly ``generate``'s greedy tokens.
``left_padded`` makes the prompt batch and ``cut_at_eos`` reads a response off an output row, for ``sample`` and
``generate`` alike (rollout workers, evaluation).
"""

from __future__ import annotations

import torch

from train.models.forward import is_ssm
from train.models.lean_decode import LeanDecoder
from train.models.preallocated_cache import preallocated_cache


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``logits`` [n, vocab] -> [n].

    p = softmax(logits / T); with top_p < 1 only the smallest set of most likely tokens whose probability
    reaches top_p keeps its mass (nucleus sampling, Holtzman et al. 2020), renormalised. The token is the first
    index whose cumulative probability exceeds u * total, u ~ U[0, 1) (inverse CDF). T = 0: argmax.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [n, vocab]
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before >= top_p, 0.0)  # the most likely token always stays (before = 0)
    cdf = probs.cumsum(dim=-1)  # [n, vocab]
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    index = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)  # [n]
    return index if order is None else order.gather(1, index[:, None]).squeeze(1)


def left_padded(tokenizer, prompts: list[str] | list[list[int]], device) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [B, P] of ``prompts`` (texts, or token ids), padded on the left as
    ``sample`` and ``generate`` expect; the tokenizer's padding side is put back as it was."""
    if prompts and not isinstance(prompts[0], str):  # token ids (multi-turn prompts built by appending ids)
        width = max(len(p) for p in prompts)
        return {
            "input_ids": torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + list(p) for p in prompts], device=device),
            "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device),
        }
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = side


def cut_at_eos(tokens: list[int], eos_token_id: int, pad_token_id: int | None = None) -> tuple[list[int], bool]:
    """(response, truncated) of an output row: ``tokens`` up to and including the first eos; without one the
    response hit the budget (truncated) and is the whole row, less any ``pad_token_id`` tokens when given."""
    if eos_token_id in tokens:
        return tokens[: tokens.index(eos_token_id) + 1], False
    return (tokens if pad_token_id is None else [t for t in tokens if t != pad_token_id]), True


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int,
           pad_token_id: int, temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None,
           compact_fraction: float = 0.25, group_size: int = 1, return_logprobs: bool = False, lean: bool = True):
    """Responses [B * group_size, max_new_tokens] to left-padded prompts ``input_ids`` [B, P] (``attention_mask``
    1 on tokens), ``group_size`` per prompt (prompt 0's first): sampled tokens up to and including eos,
    ``pad_token_id`` after it. ``return_logprobs``: also (as a pair) the log-prob [B * group_size, max_new_tokens]
    of each sampled token under the distribution it was drawn from, log_softmax(logits / T) in fp32 (before
    nucleus truncation; 0 for greedy decoding, a point mass, and after eos), for rollout/trainer mismatch checks.
    ``lean``: decode steps of Qwen2 / Llama models run train/models/lean_decode.py (the same logits without the
    Hugging Face forward's per-module Python); False, or a model it does not cover, keeps the Hugging Face forward."""
    if is_ssm(model):  # attention-free: no KV cache, the constant-size recurrent state (train/models/ssm_decode.py)
        from train.models import ssm_decode  # it imports sample_tokens from here

        return ssm_decode.sample(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id,
                                 temperature, top_p, generator, compact_fraction, group_size, return_logprobs)
    batch = input_ids.shape[0] * group_size
    out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=input_ids.device)
    out_logprobs = torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=input_ids.device) if return_logprobs else None
    if max_new_tokens == 0 or batch == 0:
        return (out, out_logprobs) if return_logprobs else out
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: the first real token is position 0
    # buffers for the prompt and every new token, written in place (no per-step torch.cat of the whole cache)
    cache = preallocated_cache(model.config.get_text_config().num_hidden_layers, input_ids.shape[1] + max_new_tokens)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    if group_size > 1:  # one prefill per prompt; its samples start from copies of its cache rows
        cache.batch_repeat_interleave(group_size)
        logits, mask, positions = (t.repeat_interleave(group_size, 0) for t in (logits, mask, positions))
    decode = LeanDecoder.of(model) if lean else None
    rows = torch.arange(batch, device=input_ids.device)  # output row of each batch row still in the cache
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)  # finished rows still in the cache
    position = positions[:, -1:]
    for t in range(max_new_tokens):
        token = sample_tokens(logits, temperature, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        out[rows, t] = token
        if return_logprobs and temperature > 0:
            picked = torch.log_softmax(logits.float() / temperature, dim=-1).gather(1, token[:, None]).squeeze(1)
            out_logprobs[rows, t] = torch.where(done, torch.zeros_like(picked), picked)
        done = done | (token == eos_token_id)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        if int(done.sum()) >= max(1, int(compact_fraction * len(rows))):  # drop finished rows from the batch
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, mask, position, token, done = rows[keep], mask[keep], position[keep], token[keep], done[keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        position = position + 1
        if decode is not None:
            logits = decode(token, position, decode.attention_mask(mask), cache)
        else:
            logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, past_key_values=cache,
                           use_cache=True).logits[:, -1]
    return (out, out_logprobs) if return_logprobs else out
