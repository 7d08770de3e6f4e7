"""train/models/lean_decode.py: the plain-torch decode step gives the Hugging Face forward's tokens and log-probs in
the sampling loop (Qwen2 with its q/k/v biases, Llama with biases and scaled rope), and is not used where it
would not be exact."""

import pytest
import torch

from train.models.lean_decode import LeanDecoder, unsupported
from train.models.sampling import sample


@pytest.fixture
def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).eval()


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, max_position_embeddings=256, attention_bias=True, mlp_bias=True,
                         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-zero biases, so a bias left out would change the logits
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def prompts():
    """Left-padded prompts of different lengths."""
    ids = torch.randint(3, 97, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4], mask[2, :1] = 0, 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("build", ["qwen2", "llama"])
@pytest.mark.parametrize("temperature, compact", [(1.0, 0.25), (0.7, 2.0), (0.0, 0.25)])
def test_lean_steps_give_the_hf_forward_tokens_and_logprobs(build, temperature, compact, qwen2, one_thread):
    model = qwen2 if build == "qwen2" else llama()
    assert unsupported(model) is None
    ids, mask = prompts()
    free = sample(model, ids, mask, 24, -1, 0, temperature=temperature, generator=torch.Generator().manual_seed(4),
                  group_size=3, lean=False)
    eos = int(free[1, 3])  # row 1 finishes at step 3 at the latest: rows leave the batch at different steps
    runs = {}
    for lean in (True, False):
        runs[lean] = sample(model, ids, mask, 24, eos, 0, temperature=temperature, generator=torch.Generator().manual_seed(4),
                            compact_fraction=compact, group_size=3, return_logprobs=True, lean=lean)
    (tokens, logprobs), (hf_tokens, hf_logprobs) = runs[True], runs[False]
    assert torch.equal(tokens, hf_tokens)
    torch.testing.assert_close(logprobs, hf_logprobs, rtol=0, atol=1e-5)
    assert (tokens == eos).any(1).sum() > 0  # some rows finished early
    if temperature == 0:  # greedy: generate's tokens on the repeated prompts
        reference = model.generate(input_ids=ids.repeat_interleave(3, 0), attention_mask=mask.repeat_interleave(3, 0),
                                   do_sample=False, max_new_tokens=24, eos_token_id=eos, pad_token_id=0)[:, ids.shape[1]:]
        reference = torch.nn.functional.pad(reference, (0, 24 - reference.shape[1]), value=0)
        assert torch.equal(tokens, reference)


def test_the_lean_step_is_the_hf_forward_logits(qwen2, one_thread):
    from train.models.preallocated_cache import preallocated_cache

    ids, mask = prompts()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [preallocated_cache(2, 12) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            qwen2(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        token, position, mask = torch.tensor([5, 6, 7]), positions[:, -1:] + 1, torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        decoder = LeanDecoder(qwen2)
        lean = decoder(token, position, decoder.attention_mask(mask), caches[0])
        hf = qwen2(input_ids=token[:, None], attention_mask=mask, position_ids=position, past_key_values=caches[1],
                   use_cache=True).logits[:, -1]
    assert torch.equal(lean, hf)
    assert torch.equal(caches[0].layers[1].keys, caches[1].layers[1].keys)


def test_unsupported_configs_keep_the_hf_forward(qwen2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    assert unsupported(qwen2) is None
    qwen2.train()
    assert "training" in unsupported(qwen2)
    qwen2.eval()
    qwen2.config._attn_implementation = "eager"
    assert "eager" in unsupported(qwen2)
    qwen2.config._attn_implementation = "sdpa"
    handle = qwen2.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert "hooks" in unsupported(qwen2)
    handle.remove()
    qwen2.model.layers[0].self_attn.q_proj = torch.nn.Sequential(qwen2.model.layers[0].self_attn.q_proj)  # a wrapper
    assert "q_proj" in unsupported(qwen2)
    sliding = Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                           sliding_window=8, max_window_layers=0, attn_implementation="sdpa")).eval()
    assert "sliding" in unsupported(sliding)
    with pytest.raises(ValueError, match="sliding"):
        LeanDecoder(sliding)
