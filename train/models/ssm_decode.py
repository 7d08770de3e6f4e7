"""Generation for attention-free (state-space) LMs with their constant-size recurrent state: Mamba-2.

A Mamba-2 layer carries two tensors from one token to the next (Dao & Gu 2024, "Transformers are SSMs", the SSD
recurrence): the last ``conv_kernel`` inputs of its causal depthwise convolution, conv [n, conv_dim, conv_kernel],
and the SSM state h [n, heads, head_dim, state_size], updated per token as h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,
y_t = h_t C_t + D x_t. Neither grows with the context, so a generated token costs the same at 16k context as at
512, and the decode state's memory is fixed; a Transformer's KV cache grows by one entry per token.

``RecurrentDecoder`` holds that state in transformers' ``DynamicCache(config=model.config)`` (one
``LinearAttentionLayer`` per block, transformers >= 5) and runs the model's own forward on it: the prompt in chunks
(``prefill_chunk`` tokens at a time, so prefill memory is flat in the prompt length too; each chunk continues the
conv and SSM states), then one token per step (the recurrent form: ``causal_conv1d_update`` and
``selective_state_update``, the mamba_ssm / causal_conv1d kernels on a GPU where installed, the torch reference
elsewhere). ``sample`` is ``train.models.sampling.sample`` for these models (``sample`` dispatches here):
same arguments, same outputs, same per-row draws of the seeded generator.

Left padding is exact: the model zeroes padded positions' inputs (``attention_mask``), so they add nothing to the
conv or SSM state (Mamba-2 without in_proj bias, the transformers default).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from train.models.sampling import sample_tokens


class RecurrentDecoder:
    """Prefill and one-token steps of an attention-free causal LM on its fixed-size conv and SSM states."""

    def __init__(self, model, prefill_chunk: int = 512):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.cache = DynamicCache(config=model.config)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of the last position of the left-padded prompts ``input_ids`` [B, P], which become the
        state (a fresh one: anything prefilled before is dropped)."""
        self.cache = DynamicCache(config=self.model.config)
        logits = None
        for start in range(0, input_ids.shape[1], self.prefill_chunk):
            end = start + self.prefill_chunk
            # a one-token chunk ignores the mask (the model's decode path); only the last chunk can be that
            # short, and left padding puts real tokens there
            logits = self.model(input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, start:end].long(),
                                cache_params=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] after appending ``tokens`` [n] (one per row of the state)."""
        return self.model(input_ids=tokens[:, None], cache_params=self.cache, use_cache=True).logits[:, -1]

    def _map_states(self, fn) -> None:
        for layer in self.cache.layers:
            for states in (layer.conv_states, layer.recurrent_states):
                for i, tensor in states.items():
                    if tensor is not None:
                        states[i] = fn(tensor)

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` (indices) of the state, in that order."""
        self._map_states(lambda t: t.index_select(0, keep.to(t.device)))

    def repeat(self, times: int) -> None:
        """Each row of the state ``times`` times in a row (one prefill shared by a prompt's samples)."""
        self._map_states(lambda t: t.repeat_interleave(times, 0))

    def state_bytes(self) -> int:
        """Bytes of the conv and SSM state tensors (the whole decode state)."""
        return sum(t.numel() * t.element_size() for layer in self.cache.layers
                   for states in (layer.conv_states, layer.recurrent_states) for t in states.values() if t is not None)


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int,
           pad_token_id: int, temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None,
           compact_fraction: float = 0.25, group_size: int = 1, return_logprobs: bool = False,
           prefill_chunk: int = 512):
    """``train.models.sampling.sample`` on the recurrent state (see there for the arguments and outputs): responses
    [B * group_size, max_new_tokens] (pad after eos), and with ``return_logprobs`` the log-prob of each sampled token
    under log_softmax(logits / T) in fp32 (0 for greedy and after eos). Finished rows leave the state once
    ``compact_fraction`` of the rows still in it are done; a prompt is prefilled once for its ``group_size`` samples."""
    batch = input_ids.shape[0] * group_size
    out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=input_ids.device)
    out_logprobs = torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=input_ids.device) if return_logprobs else None
    if max_new_tokens == 0 or batch == 0:
        return (out, out_logprobs) if return_logprobs else out
    decoder = RecurrentDecoder(model, prefill_chunk)
    logits = decoder.prefill(input_ids, attention_mask)
    if group_size > 1:
        decoder.repeat(group_size)
        logits = logits.repeat_interleave(group_size, 0)
    rows = torch.arange(batch, device=input_ids.device)  # output row of each row still in the state
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)  # finished rows still in the state
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
        if int(done.sum()) >= max(1, int(compact_fraction * len(rows))):  # drop finished rows from the state
            keep = (~done).nonzero().squeeze(1)
            decoder.select(keep)
            rows, token, done = rows[keep], token[keep], done[keep]
        logits = decoder.step(token)
    return (out, out_logprobs) if return_logprobs else out
