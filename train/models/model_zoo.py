"""Models and tokenizers: the embedded tiny default and real checkpoints, loaded by one code path.

``model=tiny`` builds a small Qwen2-architecture causal LM from a config and a byte-level BPE tokenizer
trained locally on synthetic arithmetic text (no hub access), saves both in Hugging Face format under
``model.cache_dir``, and then loads them with ``from_pretrained(path)``: exactly what happens for a real model
given by ``model.path=/path/to/checkpoint``. ``model=tiny_mamba2`` is the same with an attention-free Mamba-2
(``Mamba2ForCausalLM``) and the same tokenizer; any ``model_type`` transformers knows can be built this way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import jinja2
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from data_pipelines.arithmetic import ArithmeticSpec, generate
from data_pipelines.chat_format import CHAT_TEMPLATE, IM_END, IM_START, THINK_CLOSE, THINK_OPEN, end_of_turn_token
from train.models.document_attention import PER_DOCUMENT_SDPA

log = logging.getLogger(__name__)

PAD = "<|endoftext|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]
REASONING_TOKENS = [THINK_OPEN, THINK_CLOSE]  # added tokens that stay visible in decoded text
ATTN_IMPLEMENTATIONS = {"sdpa": PER_DOCUMENT_SDPA, "flex": "flex_attention", "flash": "flash_attention_2"}
ATTENTION_FREE = ("mamba2",)  # model types without attention (no attn_implementation to pick)


def _chatml_text(messages: list[dict]) -> str:
    """A chat in the embedded template, each message rendered as the last one (so every turn keeps its reasoning)."""
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    return "".join(template.render(messages=[m], add_generation_prompt=False) for m in messages)


def _training_corpus(num_chats: int = 3000) -> list[str]:
    corpus = []
    for seed, spec in enumerate(
        [
            ArithmeticSpec(digits=1, num_ops=2, verbosity=0.5),
            ArithmeticSpec(digits=2, num_ops=1, verbosity=0.5, word_problems=False),
            ArithmeticSpec(digits=3, num_ops=2, verbosity=0.5, turns=2),
        ]
    ):
        for chat in generate(spec, num_chats // 3, seed=10_000 + seed, prefix="tok"):
            corpus.append(_chatml_text(chat["messages"]))
    corpus.append("You are a helpful assistant. Think step by step, then give the final answer in \\boxed{}.")
    return corpus


def build_tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Byte-level BPE with single-digit tokens, ChatML special tokens, think tags and a chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=IM_END, pad_token=PAD, bos_token=None, unk_token=None
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tiny_model(tokenizer, arch: dict, seed: int = 0):
    """A randomly initialised causal LM of ``arch`` (a transformers config dict with ``model_type``)."""
    arch = dict(arch)
    config = AutoConfig.for_model(
        arch.pop("model_type"),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **arch,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def embedded_model_path(cache_dir: str | os.PathLike, arch: dict, vocab_size: int, seed: int) -> Path:
    """Build (once) and save the embedded tiny model; the directory name is a hash of what defines it."""
    # version 3: the chat template drops earlier turns' reasoning itself (same tokenizer and weights as version 2)
    key = json.dumps({"arch": arch, "vocab_size": vocab_size, "seed": seed, "version": 3}, sort_keys=True)
    path = Path(cache_dir) / f"tiny-{arch['model_type']}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (path / "config.json").exists():
        return path
    log.info("building the embedded tiny model and tokenizer in %s", path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tokenizer = build_tiny_tokenizer(vocab_size)
    model = build_tiny_model(tokenizer, arch, seed)
    tokenizer.save_pretrained(tmp)
    model.save_pretrained(tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished the same build first; theirs is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_model_path(model_cfg) -> Path:
    """``model.path`` if given (must exist), else the embedded tiny model built from ``model.tiny``."""
    if model_cfg.get("path"):
        path = Path(model_cfg.path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"model.path={model_cfg.path!r} has no config.json: give a local Hugging Face checkpoint "
                "directory (this machine cannot download from a hub), or leave model.path empty for the tiny model"
            )
        return path
    tiny = model_cfg.tiny
    return embedded_model_path(model_cfg.cache_dir, dict(tiny.arch), tiny.vocab_size, tiny.seed)


def load_tokenizer(path):
    """The checkpoint's tokenizer with its eos set to its chat template's end-of-turn token (where generation
    stops: Gemma ends turns with ``<end_of_turn>``, not its ``<eos>``), and a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    end_of_turn = end_of_turn_token(tokenizer)
    if tokenizer.eos_token != end_of_turn:
        log.info("%s: eos token %r -> %r, the chat template's end of turn", path, tokenizer.eos_token, end_of_turn)
        tokenizer.eos_token = end_of_turn
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path, attn_backend: str = "sdpa", dtype: torch.dtype = torch.float32, device="cpu"):
    """``from_pretrained`` with the attention implementation the backend needs (see train.models.attention).
    Attention-free models (Mamba-2) ignore ``attn_backend``: train/models/forward.py keeps their documents apart."""
    if AutoConfig.from_pretrained(path).model_type in ATTENTION_FREE:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=ATTN_IMPLEMENTATIONS[attn_backend], dtype=dtype
    )
    return model.to(device)
