"""Which architectures our packed attention mask is exact for, and why the others are refused.

Packed rows reach a Hugging Face model as one custom mask (train/models/attention.py: a dense 4D mask under sdpa,
a BlockMask under flex, varlen boundaries under flash). Found by the packed-vs-unpacked equivalence test
(tests/train/models/test_architectures.py), transformers 5.23:
- exact: Qwen2, Qwen3, Llama, Mistral without a sliding window, Phi-3, Qwen3-MoE, Mixtral, Gemma-3 while
  documents fit in its sliding window;
- sliding-window layers (Mistral with ``sliding_window``, Gemma-2/3's local layers): a custom mask replaces the
  model's own masks for every layer, so the window is not applied; exact only while no sequence is longer than
  the window (every key is then inside it) -> refused when documents may be longer;
- no implementation for the backend (Gemma-2 has no sdpa path: it soft-caps attention logits, which sdpa cannot)
  -> refused under that backend; Gemma-2 under flex applies the soft-cap with our BlockMask (its packed forward
  matches the unpacked eager forward; CPU forward-only there, tested).
"""

from __future__ import annotations

from train.models.model_zoo import ATTENTION_FREE

# backend -> the flag transformers' model classes carry when they implement it
_SUPPORT_FLAGS = {"sdpa": "_supports_sdpa", "flex": "_supports_flex_attn", "flash": "_supports_flash_attn"}


def sliding_window(config) -> int | None:
    """The attention window of the model's sliding-window layers, None if it has none."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2/Qwen3 configs carry a window they do not use
        return None
    return int(window)


def packed_attention_problem(config, attn_backend: str, max_tokens: int, length_key: str) -> str | None:
    """Why packed training of ``config``'s architecture under ``attn_backend`` would not be exact for sequences
    of up to ``max_tokens`` tokens (``length_key`` names the setting that bounds them), or None if it is."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_type = getattr(config, "model_type", "?")
    if model_type in ATTENTION_FREE:  # no attention: forward.py keeps documents apart itself
        return None
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is not None and not getattr(model_class, _SUPPORT_FLAGS.get(attn_backend, ""), True):
        others = [b for b, flag in _SUPPORT_FLAGS.items() if getattr(model_class, flag, False)]
        softcap = getattr(config, "attn_logit_softcapping", None)
        why = f" (it soft-caps attention logits, attn_logit_softcapping={softcap})" if softcap is not None else ""
        return (f"model_type={model_type} has no model.attn_backend={attn_backend} implementation in transformers{why}: "
                f"use model.attn_backend={' or '.join(others) or '(none supported)'}")
    window = sliding_window(config)
    if window is not None and max_tokens > window:
        return (f"model_type={model_type} has sliding-window attention layers (sliding_window={window}), which the "
                f"packed attention mask does not apply: sequences up to {length_key}={max_tokens} tokens would see "
                f"past the window; set {length_key} <= {window}")
    return None
