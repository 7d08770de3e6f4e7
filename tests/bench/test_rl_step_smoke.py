"""bench/rl_step.py sets TRL up for the same step as ours: the same prompts in the same order, P*G completions
generated once and used in one optimizer step. Config only (the bench itself is too slow for the suite)."""

from types import SimpleNamespace

from tests.bench.bench_modules import load_bench


def test_trl_step_is_ours(compose, tmp_path):
    from trl.trainer.utils import RepeatSampler

    bench = load_bench("rl_step")
    args = SimpleNamespace(prompts=3, group=4, max_new_tokens=16, beta=0.0, warmup=1, steps=2, seed=0)
    cfg = compose(["experiment=quickstart_rl", "rollout.prompts_per_step=3", "algorithm.group_size=4"])
    config = bench.trl_config(cfg, args, str(tmp_path / "trl"))
    # one generation of P*G completions per optimizer step, no reuse, no activation recomputation
    assert config.generation_batch_size == 12 and config.steps_per_generation == 1
    assert config.gradient_accumulation_steps == 1 and config.num_iterations == 1
    assert config.num_generations == 4 and config.max_completion_length == 16 and config.max_steps == 3
    assert not config.activation_checkpointing and not config.gradient_checkpointing and not config.bf16 and config.beta == 0.0

    batches = bench.step_prompts(cfg, 3)
    assert [len(b) for b in batches] == [3, 3, 3]
    # GRPOTrainer's sampler with these settings: step s gets dataset rows 3s..3s+2, each G times, in order
    sampler = RepeatSampler(range(9), mini_repeat_count=config.num_generations,
                            batch_size=config.generation_batch_size // config.num_generations, shuffle=config.shuffle_dataset)
    order = list(sampler)
    assert order[:12] == [0] * 4 + [1] * 4 + [2] * 4 and order[12:16] == [3] * 4 and len(order) == 36


def test_trl_side_runs_on_every_core_unless_told(monkeypatch):
    """An OMP_NUM_THREADS=1 exported in the shell must not put TRL on one thread (ours sets its counts itself):
    in two consecutive runs on 2026-12-07 TRL took 1.62 s/step on one thread against 1.34 s on two."""
    import os

    bench = load_bench("rl_step")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert bench.trl_threads(None) == 6
    assert bench.trl_threads(3) == 3
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert bench.trl_threads(None) == 1
