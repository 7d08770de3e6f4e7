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


def test_rounds_alternate_the_sides_and_pool_their_steps(monkeypatch):
    """--rounds: the order flips every round (a machine that drifts weighs on both sides alike) and the medians are
    over every measured step of every round; --workers defaults to one per core, at most one per prompt."""
    import os

    bench = load_bench("rl_step")
    args = SimpleNamespace(trl_first=False, only=None, no_async=True, rounds=3)
    assert bench.side_order(args) == ["ours", "trl", "trl", "ours", "ours", "trl"]
    args.no_async, args.rounds = False, 2
    assert bench.side_order(args) == ["ours", "async", "trl", "trl", "async", "ours"]
    args.only = "trl"
    assert bench.side_order(args) == ["trl", "trl"]
    run = lambda walls, gen, load: {"phases": {"generation": gen}, "walls": walls, "wall": sum(walls) / len(walls),  # noqa: E731
                                     "length": 10.0 * gen, "reward": gen, "total": 2 * gen, "load": load, "threads": "t"}
    merged = bench.merge_rounds([run([1.0, 3.0], 0.5, (0.1, 0.2)), run([2.0, 6.0, 4.0], 1.5, (0.3, 0.4))])
    assert merged["walls"] == [1.0, 3.0, 2.0, 6.0, 4.0] and merged["wall"] == 3.2
    assert merged["phases"] == {"generation": 1.0} and merged["length"] == 10.0 and merged["total"] == 2.0
    assert merged["load"] == (0.1, 0.4)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert bench.default_workers(8) == 2 and bench.default_workers(1) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert bench.default_workers(8) == 1


def test_compose_config_turns_compile_on_only_when_asked(compose):
    bench = load_bench("rl_step")
    base = dict(prompts=2, group=2, max_new_tokens=8, beta=0.0, warmup=1, steps=1, seed=0, workers=2, world_size=1,
                model_path=None, ours=[])
    assert bench.compose_config(SimpleNamespace(**base, compile=True), "/tmp/x").trainer.compile is True
    assert bench.compose_config(SimpleNamespace(**base), "/tmp/x").trainer.compile is False  # rl_scaling, gpu_check
