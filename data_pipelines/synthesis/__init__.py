"""PromptCoT-style problem synthesis (Zhao et al., arXiv 2503.02324): the data parts, one file per stage component.

concepts.py (stage 1: concept combinations) -> generators.py (stage 2 rationale, stage 3 problem) ->
solvers.py + estimate.py (stage 4: pass rate over k samples, difficulty label) -> filtering.py (stage 5: pass-rate
band, training rows); store.py is the resumable jsonl writer. Generators and solvers that run a model receive a
text backend object; the backends (hf / vllm / ray) and the recipe that runs the stages in order live above the
models, in train/synthesis/ (``python -m train.synthesis``).
"""
