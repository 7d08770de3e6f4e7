"""RL held-out evaluation on the rollout workers (train/models/evaluate.py ``evaluate_on_pool``, called by
train/rl/loop.py): the same metrics and completions as the driver-side ``evaluate`` on the same weights (tiny model,
fp32, greedy), after a weight sync."""

import pytest
import torch
from omegaconf import OmegaConf

from data_pipelines.arithmetic import ArithmeticSpec, generate
from tests.conftest import TEST_ARCH
from train.models import evaluate as ev
from train.models.model_zoo import load_model, load_tokenizer, resolve_model_path

ray = pytest.importorskip("ray")
NEW_TOKENS = 24


class SubstringScorer:
    """Right when the reference occurs in the response: math-verify finds no answer in a random model's text, and
    the comparison should cover accuracy too (both paths score through the same ``_scores``)."""

    def __call__(self, texts, answers):
        return [answer in text for text, answer in zip(texts, answers)]


@pytest.mark.slow  # a Ray pool of 2 workers: ~1-2 min on 2 busy cores
def test_pool_evaluation_equals_the_driver_side_evaluation(ray_session, model_cache):
    from train.workers.actors import RolloutPool

    # untied and wider-initialised than TEST_ARCH: the random model's greedy responses vary and some end their turn
    arch = {**TEST_ARCH, "tie_word_embeddings": False, "initializer_range": 0.2}
    cfg = OmegaConf.create({"path": None, "cache_dir": str(model_cache), "tiny": {"vocab_size": 384, "seed": 9, "arch": arch}})
    path = str(resolve_model_path(cfg))
    model, tokenizer = load_model(path), load_tokenizer(path)
    with torch.no_grad():  # the weights the pool gets by a sync, not from the checkpoint its workers load
        for param in model.parameters():
            param.mul_(1.1)
    rows = generate(ArithmeticSpec(digits=2), 12, seed=31)
    prompts = ev.eval_prompts(tokenizer, rows)
    completions = ev.generate_greedy(model, tokenizer, prompts, NEW_TOKENS)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    # references: a piece of every other greedy response (right), one no response holds for the rest
    rows = [{**row, "answer": text[2:5] if i % 2 == 0 and len(text) >= 5 else "no such text"}
            for i, (row, text) in enumerate(zip(rows, texts))]
    scorer = SubstringScorer()

    driver = ev.evaluate(model, tokenizer, rows, NEW_TOKENS, batch_size=4, scorer=scorer)
    pool = RolloutPool(2, path)  # the workers load the unchanged model; the sync brings the changed weights
    try:
        pool.sync({n: p.detach().clone() for n, p in model.named_parameters()}, version=1)
        on_pool = ev.evaluate_on_pool(pool, tokenizer, rows, NEW_TOKENS, batch_size=4, scorer=scorer)
        greedy = ev.pool_completions(pool, tokenizer, prompts, 1, NEW_TOKENS, 0.0, 1.0, 4, 0)
        sampled = ev.evaluate_on_pool(pool, tokenizer, rows, NEW_TOKENS, batch_size=4, samples=2, scorer=scorer)
    finally:
        pool.shutdown()
    assert greedy == completions  # token for token, over 2 workers and 2 calls (8 and 4 prompts)
    assert 0 < driver["eval/truncated_fraction"] < 1 and 0 < driver["eval/accuracy"] < 1, driver
    assert on_pool == driver  # every metric and the logged samples
    # rollout.eval_samples: the same eval/sampled_* metrics, drawn by the workers' own seeded generators
    driver_sampled = ev.evaluate(model, tokenizer, rows, NEW_TOKENS, batch_size=4, samples=2, scorer=scorer)
    assert sampled.keys() == driver_sampled.keys()
    assert {k: v for k, v in sampled.items() if not k.startswith("eval/sampled_")} == driver
    assert 0 < sampled["eval/sampled_response_length_mean"] <= NEW_TOKENS
