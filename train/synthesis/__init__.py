"""The PromptCoT synthesis recipe (recipe.py: concepts -> rationales -> problems -> difficulty -> filter, and its
CLI, ``python -m train.synthesis``) and the text backends that run models for it (backends.py: hf, vllm, ray).
The stage components it runs are data_pipelines/synthesis/."""
