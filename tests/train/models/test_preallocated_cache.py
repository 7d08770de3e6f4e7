"""train/models/preallocated_cache.py: the in-place KV cache returns exactly the tensors Hugging Face's
concatenating DynamicLayer returns, through prefill, decode steps, row repeats and row drops."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from train.models.preallocated_cache import PreallocatedLayer, preallocated_cache


def test_same_keys_and_values_as_the_dynamic_layer():
    torch.manual_seed(0)
    ours, theirs = PreallocatedLayer(capacity=9), DynamicLayer()
    steps = [torch.randn(2, 3, 4, 5)] + [torch.randn(6, 3, 1, 5) for _ in range(3)] + [torch.randn(4, 3, 1, 5)] * 2
    for i, k in enumerate(steps):
        if i == 1:  # after the prefill: 3 samples per prompt
            ours.batch_repeat_interleave(3)
            theirs.batch_repeat_interleave(3)
        if i == 4:  # two rows finished
            keep = torch.tensor([0, 2, 3, 5])
            ours.batch_select_indices(keep)
            theirs.batch_select_indices(keep)
        a, b = ours.update(k, -k), theirs.update(k, -k)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert ours.get_seq_length() == theirs.get_seq_length()
    assert ours.get_seq_length() == 9 and ours.get_mask_sizes(1) == (10, 0)
    with pytest.raises(ValueError, match="cannot take 10"):
        ours.update(steps[-1], steps[-1])


def test_crop_and_a_cache_of_layers():
    layer = PreallocatedLayer(capacity=4)
    layer.update(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    layer.crop(-1)
    assert layer.keys.shape == (1, 1, 2, 2) and layer.get_seq_length() == 2
    cache = preallocated_cache(num_layers=3, capacity=4)
    assert len(cache.layers) == 3 and all(isinstance(x, PreallocatedLayer) for x in cache.layers)
    assert cache.get_seq_length() == 0
