"""``trainer.compile`` (train/models/compiled.py): a trainer rank with the compiled forward takes the plain model's
step (loss and every gradient) on packed documents and on shared-prompt batches; the compiled graphs really run
and serve a batch of other shapes without compiling again; a machine
without a C++ compiler and a non-bool value are refused before any work.

Tolerances (fp32): the compiled kernels fuse element-wise ops and sum in another order, so losses agree to 1e-5
relative and gradients to 1e-5 of each tensor's largest magnitude (a few ulps), as for the tiled logits.
"""

import pytest
import torch
from omegaconf import OmegaConf

from data_pipelines.packing import IGNORE_INDEX
from data_pipelines.shared_prompt import SharedPromptBatch, collate_groups
from tests.train.models.test_tiled_logits import _packed
from tests.train.workers.test_long_sequence_trainer import TRAINER, _assert_same, model_path  # noqa: F401 (fixture)
from train.models import compiled
from train.models.forward import token_logprobs
from train.models.model_zoo import load_model
from train.run.config_checks import ConfigError, check_compile

pytestmark = pytest.mark.usefixtures("one_thread")


def _shared(seed: int, prompts: int, group: int):
    """``prompts`` prompts of 5-12 tokens with ``group`` responses of 3-20 tokens each (ids 1..383, 0 pads)."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: torch.randint(1, 384, (int(torch.randint(lo, hi, (1,), generator=gen)),), generator=gen).tolist()  # noqa: E731
    prompt_ids = [draw(5, 13) for _ in range(prompts)]
    responses = [[draw(3, 21) for _ in range(group)] for _ in range(prompts)]
    masks = [[[True] * len(r) for r in rs] for rs in responses]
    return collate_groups(prompt_ids, responses, masks, [[f"{i}.{j}" for j in range(group)] for i in range(prompts)], 0)


def _plain_step(model, batch, loss_fn, extra):
    logprobs, entropy = token_logprobs(model, batch, "sdpa", with_entropy=getattr(loss_fn, "needs_entropy", True))
    loss, _ = loss_fn(logprobs, entropy, batch, extra)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.slow  # one Ray actor rank; compiling its graphs takes ~1 min on a fresh machine
def test_compiled_rank_takes_the_plain_step(model_path, compose):  # noqa: F811
    """A trainer rank (a Ray actor, as in the recipes: one DeepSpeed world per process) with trainer.compile=true,
    the GRPO loss of quickstart_rl, on packed documents, a shared-prompt batch and one of other shapes."""
    ray = pytest.importorskip("ray")
    from train.rl.algorithm import Algorithm, PackedLoss
    from train.workers.actors import TrainerGroup
    from train.workers.ray_session import init_ray

    objective = Algorithm.from_config(compose(["experiment=quickstart_rl"]).algorithm).objective
    plain = load_model(model_path).train()
    init_ray(num_cpus=2)
    try:
        group = TrainerGroup(1, model_path, "sdpa", {**TRAINER, "compile": True}, micro_batches_per_rank=1, num_threads=1)
        graphs = lambda module: __import__("torch._dynamo.utils", fromlist=["counters"]).counters["stats"]["unique_graphs"]  # noqa: E731
        assert group.apply_to_model(lambda module: module.compiled_forward) is True
        seen = None
        # packed documents, a shared-prompt batch, then one of other shapes (more prompts, other lengths)
        for seed, batch in enumerate((_packed(seed=6), _shared(seed=1, prompts=2, group=3), _shared(seed=3, prompts=3, group=4))):
            docs = len(batch.sample_ids)
            tokens = batch.loss_mask.sum() if isinstance(batch, SharedPromptBatch) else (batch.labels[:, 1:] != IGNORE_INDEX).sum()
            loss_fn = PackedLoss(objective, normalizer=float(tokens))  # the token-mean over this step's response tokens
            extra = {"advantages": torch.linspace(-1, 1, docs), "old_logprobs": None, "ref_logprobs": None}
            plain.load_state_dict(group.full_state_dict(), strict=False)  # the weights before this step (lm_head tied)
            want = _plain_step(plain, batch, loss_fn, extra)
            stats = group.train_step([batch], loss_fn, [extra], keep_gradients=True)[0]
            _assert_same((stats["loss_sum"], group.gradients()), want, f"compiled step {seed} on {type(batch).__name__}",
                         loss_rel=1e-5)
            if seed == 1:
                seen = group.apply_to_model(graphs)
                assert seen > 0  # the compiled path ran (dynamo built graphs for it)
        assert group.apply_to_model(graphs) == seen  # dynamic shapes: the new shapes reused the graphs
        group.shutdown()
    finally:
        ray.shutdown()


def test_compile_needs_a_cpp_compiler_on_cpu(monkeypatch, tmp_path, request):
    from torch._inductor import config, cpp_builder

    # inductor memoises its compiler search (per search tuple): forget what earlier tests found, and what this finds
    cpp_builder.cpp_compiler_search.cache_clear()
    request.addfinalizer(cpp_builder.cpp_compiler_search.cache_clear)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no g++
    monkeypatch.setattr(config.cpp, "cxx", (None, "g++"))  # inductor's search without $CXX
    problem = compiled.compiler_problem(on_gpu=False)
    assert "trainer.compile=true" in problem and "g++" in problem and "trainer.compile=false" in problem
    assert compiled.compiler_problem(on_gpu=True) is None  # GPU kernels are Triton's
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        check_compile(OmegaConf.create({"compile": True}))
    check_compile(OmegaConf.create({"compile": False}))  # off: nothing is needed
    monkeypatch.setattr(config.cpp, "cxx", (None, "/usr/bin/true"))  # $CXX when torch imported inductor: wins over PATH
    assert compiled.compiler_problem(on_gpu=False) is None


def test_compile_must_be_a_bool():
    with pytest.raises(ConfigError, match="trainer.compile='yes' must be true or false"):
        check_compile(OmegaConf.create({"compile": "yes"}))
