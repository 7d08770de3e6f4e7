"""A KV cache whose per-layer buffers are allocated once for the whole generation (train/models/sampling.py).

Hugging Face's ``DynamicLayer`` appends each step's keys and values with ``torch.cat``, which copies the whole cache
at every decode step (O(L^2) bytes moved for L generated tokens; on the embedded tiny model about a fifth of the
sampling time). A ``PreallocatedLayer`` holds [batch, heads, capacity, head_dim] buffers, writes the new keys and
values in place and hands attention a view of the filled part ``[:, :, :length]``: the same values as the
concatenated tensors, so the same attention output. Rows can still be repeated (one prefill per prompt, G samples)
and dropped (finished rows), as on a ``DynamicLayer``. Only for full (non-sliding) attention layers, as
``DynamicCache()`` without a config, which ``sample`` used before.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One attention layer's cache in buffers of ``capacity`` positions, filled left to right."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = int(capacity)
        self.length = 0
        self._keys: torch.Tensor | None = None  # [batch, heads, capacity, head_dim]
        self._values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, _ = key_states.shape
        self._keys = key_states.new_empty(batch, heads, self.capacity, key_states.shape[-1])
        self._values = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def _views(self) -> None:
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot take {end}; allocate a longer one")
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self._keys = self._values = self.keys = self.values = None
        self.length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.length = max(self.length + tokens_to_remove, 0)
        if self.is_initialized:
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)


def preallocated_cache(num_layers: int, capacity: int) -> Cache:
    """A cache of ``num_layers`` ``PreallocatedLayer`` of ``capacity`` positions (prompt width + new tokens)."""
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])
