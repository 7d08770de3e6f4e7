"""``trainer.compile``: the trainer ranks' forward (and so its backward) under ``torch.compile`` (TRL's
``torch_compile``, verl's ``use_torch_compile``).

Two regions are compiled, both with dynamic shapes (the rows and lengths of every micro-batch differ, so one graph
serves them all instead of one compilation per shape):

- the model's forward, through DeepSpeed's ``engine.compile`` (``module.compile``: the Hugging Face model's
  ``__call__``, so the engine's own hooks stay eager). The shared-prompt layout calls it twice per micro-batch
  (the prompts with an empty KV cache, the responses on the filled one): two graphs, compiled once each;
- ``label_logprobs`` (log-softmax over the vocabulary, the target's log-prob, the entropy): element-wise work over
  tokens x vocabulary that the compiler fuses.

The numbers are the eager ones up to float rounding (fused kernels sum in another order; tested to 1e-5 of each
gradient's largest entry in fp32). The first micro-batch of each kind pays the compilation (tens of seconds for
a small model on CPU; inductor caches compiled kernels on disk, under TORCHINDUCTOR_CACHE_DIR, for later runs).
On CPU the compiler writes C++ kernels and needs a C++ compiler (``compiler_problem``).
"""

from __future__ import annotations

import functools

import torch

from train.models.tiled_logits import label_logprobs

COMPILED_ATTRIBUTE = "compiled_forward"  # set on the model by compile_forward


def compiler_problem(on_gpu: bool) -> str | None:
    """Why ``torch.compile`` could not build kernels on this machine, or None. CPU kernels are C++: inductor's own
    search (``cpp_builder.get_cpp_compiler``: ``torch._inductor.config.cpp.cxx``, i.e. $CXX as set when torch
    imported it, else g++) must find a compiler that runs."""
    if on_gpu:
        return None
    from torch._inductor import config
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        tried = " / ".join(c for c in config.cpp.cxx if c)
        return (f"trainer.compile=true on CPU needs a C++ compiler for torch.compile's kernels ({tried} not found): "
                "install one (apt-get install g++, or set CXX) or set trainer.compile=false")
    return None


def compile_forward(engine) -> None:
    """Compile a DeepSpeed ``engine``'s forward (``engine.compile``: its module's ``__call__``) with dynamic shapes, and
    make ``token_logprobs`` of it use the compiled ``label_logprobs``. Checks the compiler again here: a rank may run
    on another node than the driver that checked the config."""
    problem = compiler_problem(torch.cuda.is_available())
    if problem:
        raise RuntimeError(problem)
    engine.compile(compile_kwargs={"dynamic": True})
    setattr(engine.module, COMPILED_ATTRIBUTE, True)


def is_compiled(model) -> bool:
    """Whether ``compile_forward`` compiled ``model`` (a DeepSpeed engine or the module it wraps)."""
    return getattr(getattr(model, "module", model), COMPILED_ATTRIBUTE, False)


@functools.cache
def compiled_label_logprobs():
    """``label_logprobs`` under ``torch.compile(dynamic=True)``, one wrapper per process (compiled on first use)."""
    return torch.compile(label_logprobs, dynamic=True)


def head_logprobs(model):
    """The ``label_logprobs`` that ``token_logprobs`` of ``model`` runs: compiled where the model is."""
    return compiled_label_logprobs() if is_compiled(model) else label_logprobs
