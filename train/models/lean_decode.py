"""One decode step (one new token per row) of a Qwen2 or Llama causal LM in plain torch, for the sampling loop
(train/models/sampling.py).

The Hugging Face forward spends most of a one-token step in Python: a module call per projection and norm, the
causal-mask construction, the output dataclasses. ``LeanDecoder`` runs the same tensor operations, in the same
order and on the model's own parameters (no copies), so its logits are the Hugging Face forward's:

    h = embed[token];  per layer:  x = rmsnorm(h);  q, k, v = x W_q + b_q, x W_k + b_k, x W_v + b_v
    q, k = q cos + rot(q) sin, k cos + rot(k) sin     (the model's own rotary module: rope scaling included)
    K, V = cache.update(k, v)                          (written in place, train/models/preallocated_cache.py)
    h = h + sdpa(q, K, V, mask = attention mask of the left-padded rows) W_o
    h = h + (act(x' W_gate) * x' W_up) W_down,  x' = rmsnorm(h);      logits = rmsnorm(h) W_head

with grouped-query attention as ``sdpa_attention_forward`` does it for one query row (the heads of a key/value
head packed along the query axis). ``unsupported`` names why a model is not handled (another architecture, LoRA or
other wrapped layers, hooks, sliding-window layers, an attention backend other than sdpa, training mode); the
loop then keeps the Hugging Face forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from train.models.preallocated_cache import PreallocatedLayer

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}


def unsupported(model) -> str | None:
    """Why ``LeanDecoder`` would not reproduce ``model``'s forward exactly, or None where it does."""
    name = type(model).__name__
    if ARCHITECTURES.get(name) != getattr(model.config, "model_type", None):
        return f"architecture {name} (lean decode covers {sorted(ARCHITECTURES)})"
    if model.training:
        return "the model is in training mode (dropout)"
    config = model.config
    if config._attn_implementation != "sdpa":
        return f"attention backend {config._attn_implementation!r} (lean decode reproduces sdpa)"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return "sliding-window attention layers"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    if len(model.model.layers) != config.num_hidden_layers:
        return "a layer count other than config.num_hidden_layers"
    for module_name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"hooks on {module_name or 'the model'}"
        if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
            return f"{module_name} is a {type(module).__name__} (LoRA or another wrapped linear layer)"
        leaf = module_name.rsplit(".", 1)[-1]
        if leaf.endswith("_proj") and type(module) is not nn.Linear:
            return f"{module_name} is a {type(module).__name__}, not a plain nn.Linear"
    if type(model.lm_head) is not nn.Linear or type(model.model.embed_tokens) is not nn.Embedding:
        return "a wrapped embedding or lm_head"
    return None


class LeanDecoder:
    """The one-token forward of ``model`` (see the module docstring); ``unsupported(model)`` must be None."""

    def __init__(self, model):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"lean decode cannot reproduce this model: {reason}")
        self.model = model
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.groups = self.heads // self.kv_heads
        self.scaling = model.model.layers[0].self_attn.scaling

    @classmethod
    def of(cls, model) -> LeanDecoder | None:
        """The lean decoder of ``model``, or None where ``unsupported(model)`` names a reason."""
        try:
            return cls(model)
        except ValueError:
            return None

    def attention_mask(self, mask: torch.Tensor) -> torch.Tensor | None:
        """Additive sdpa mask [n, 1, 1, length] of a 2D ``mask`` (1 on tokens): -inf on padding (the causal part is
        all-true for the newest token); None where no row has padding, as Hugging Face's mask creation. The same
        attention as its boolean mask, converted once per step instead of in every layer."""
        if bool(mask.all()):
            return None
        dtype = self.model.lm_head.weight.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask == 0, float("-inf"))[:, None, None, :]

    def __call__(self, token: torch.Tensor, position: torch.Tensor, attn_mask: torch.Tensor | None,
                 cache) -> torch.Tensor:
        """Logits [n, vocab] of ``token`` [n] at ``position`` [n, 1]; keys and values go into ``cache``
        (``PreallocatedLayer`` per layer, filled by the prefill), ``attn_mask`` from ``attention_mask``."""
        inner = self.model.model
        hidden = F.embedding(token[:, None], inner.embed_tokens.weight)  # [n, 1, hidden]
        cos, sin = inner.rotary_emb(hidden, position)  # [n, 1, head_dim]
        n = hidden.shape[0]
        for layer, layer_cache in zip(inner.layers, cache.layers):
            if type(layer_cache) is not PreallocatedLayer:
                raise TypeError("lean decode writes a preallocated cache (train/models/preallocated_cache.py)")
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(n, 1, -1, self.head_dim).transpose(1, 2)
            k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(n, 1, -1, self.head_dim).transpose(1, 2)
            v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(n, 1, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)  # [n, heads, 1, head_dim], transformers' own
            keys, values = layer_cache.update(k, v)  # [n, kv_heads, length, head_dim]
            if self.groups > 1:  # the query heads of a key/value head along the query axis
                q = q.reshape(n, self.kv_heads, self.groups, self.head_dim)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, scale=self.scaling)
            out = out.reshape(n, -1, 1, self.head_dim).transpose(1, 2).contiguous().reshape(n, 1, -1)
            hidden = hidden + F.linear(out, attn.o_proj.weight, attn.o_proj.bias)
            mlp = layer.mlp
            x = layer.post_attention_layernorm(hidden)
            gate = mlp.act_fn(F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias))
            up = F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
            hidden = hidden + F.linear(gate * up, mlp.down_proj.weight, mlp.down_proj.bias)
        hidden = inner.norm(hidden)
        return F.linear(hidden[:, -1], self.model.lm_head.weight, self.model.lm_head.bias)  # [n, vocab]
