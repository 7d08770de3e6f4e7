"""LoRA through peft (``model.lora.*``): the trainer wraps its model in adapters, and hands out MERGED weights.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") keeps a pretrained linear weight
W [out, in] frozen and trains a low-rank update: y = x W^T + (alpha / r) * dropout(x) A^T B^T, A [r, in] and
B [out, r] (B starts at 0, so the wrapped model starts equal to the base). The merged weight is

    W' = W + (alpha / r) * B @ A

and a plain model holding W' computes the same function as the adapter model in eval mode (no dropout). So the
trainer ranks train only A and B, while rollout workers, the reference and the driver's HF model see an ordinary
model under the base model's parameter names (``merged_state_dict``), as OpenRLHF and TRL do when they sync a
LoRA policy to vLLM (merge, then load the full weights).

Config keys (configs/model/*.yaml): ``rank`` (null = LoRA off), ``alpha``, ``dropout``, ``target_modules``
(module names as peft matches them: the last name component of a linear layer, e.g. q_proj).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch

ADAPTER_DIR = "adapter"  # inside a checkpoint: peft's save_pretrained format (adapter_config.json + adapter_model.safetensors)


def lora_enabled(lora) -> bool:
    """``model.lora`` turns LoRA on when it is set and its ``rank`` is not null."""
    return lora is not None and lora.get("rank") is not None


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last name components of the model's linear layers (what ``target_modules`` may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name})


def missing_target_modules(model: torch.nn.Module, target_modules: Iterable[str]) -> list[str]:
    """The names of ``target_modules`` that match no linear layer of ``model``."""
    present = set(linear_module_names(model))
    return [name for name in target_modules if name not in present]


def wrap(model: torch.nn.Module, lora) -> torch.nn.Module:
    """``model`` wrapped by peft in LoRA adapters of ``lora`` (a dict of the ``model.lora`` keys); only the
    adapters' parameters require grad. The base weights are shared with ``model``, not copied."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=int(lora["rank"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora.get("dropout", 0.0)),
                        target_modules=list(lora["target_modules"]), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_adapter_parameter(name: str) -> bool:
    """A parameter peft added (lora_A / lora_B ...), as opposed to a base model weight."""
    return any(part.startswith("lora_") for part in name.split("."))


def merged_state_dict(peft_model, gather: Callable[[list], object] = lambda params: nullcontext(),
                      keep: bool = True) -> dict[str, torch.Tensor] | None:
    """The parameters of the merged model, W + (alpha / r) * B @ A for every adapted layer, under the base model's
    names (``model.layers.0.self_attn.q_proj.weight``), computed from peft's ``get_delta_weight`` without changing
    the training model. ``gather(params)``: a context that makes partitioned (ZeRO-3) parameters whole; every rank
    enters it, only the ones with ``keep`` return the dict (None elsewhere)."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    layers = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, param in base.named_parameters():
            if is_adapter_parameter(name):
                continue
            if ".base_layer." not in name:
                with gather([param]):
                    if keep:
                        state[name] = param.detach().cpu().clone()
                continue
            owner, leaf = name.split(".base_layer.")
            layer = layers[owner]
            adapter_params = [p for n, p in layer.named_parameters() if is_adapter_parameter(n)]
            with gather([param, *adapter_params]):
                value = param.detach()
                if leaf == "weight":  # summed in fp32, returned in the weight's dtype (bf16 on GPU)
                    total = value.float()
                    for adapter in layer.active_adapters:
                        total = total + layer.get_delta_weight(adapter).float()
                    value = total.to(param.dtype)
                if keep:
                    state[f"{owner}.{leaf}"] = value.cpu().clone()
    return state if keep else None


def adapter_state_dict(peft_model, gather: Callable[[list], object] = lambda params: nullcontext(),
                       keep: bool = True) -> dict[str, torch.Tensor] | None:
    """The adapter parameters under peft's names (what ``save_pretrained`` writes), gathered like ``merged_state_dict``."""
    state = {}
    for name, param in peft_model.named_parameters():
        if is_adapter_parameter(name):
            with gather([param]):
                if keep:
                    state[name] = param.detach().cpu().clone()
    return state if keep else None


def save_adapter(peft_model, directory, state_dict: dict[str, torch.Tensor]) -> None:
    """peft's adapter format in ``directory``: adapter_config.json + adapter_model.safetensors, loadable with
    ``PeftModel.from_pretrained(base_model, directory)``."""
    peft_model.save_pretrained(str(directory), state_dict=state_dict, safe_serialization=True)
