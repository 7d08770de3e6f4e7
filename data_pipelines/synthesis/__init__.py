"""PromptCoT-style problem synthesis (Zhao et al., arXiv 2503.02324), one file per stage component.

concepts.py (stage 1: concept combinations) -> generators.py (stage 2 rationale, stage 3 problem) ->
solvers.py + estimate.py (stage 4: pass rate over k samples, difficulty label) -> filtering.py (stage 5: pass-rate
band, training rows). backends.py holds the text backends (hf / vllm / ray), store.py the resumable jsonl
writer. The recipe that runs them in order is data_pipelines/synthesize.py (``python -m data_pipelines.synthesize``).
"""
