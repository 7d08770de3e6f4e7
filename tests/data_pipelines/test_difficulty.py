"""Pass-rate tracker and difficulty-aware RL samplers: band focus against uniform, easy->hard schedules, resume."""

import copy
import random
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from data_pipelines.difficulty import BandSampler, PassRateTracker, ScheduleSampler
from data_pipelines.prompts import Prompt, PromptSampler

SAMPLER_CONFIGS = Path(__file__).resolve().parents[2] / "configs/sampler"


def _prompts(n=400, seed=0):
    """Prompts with known true pass rates (uniform on [0, 1]) and a static difficulty level 1..4 in meta."""
    rng = random.Random(seed)
    prompts, true = [], {}
    for i in range(n):
        pid = f"p{i}"
        true[pid] = rng.random()
        prompts.append(Prompt(pid, f"question {i}", "0", {"difficulty": {"level": 1 + i % 4}}))
    return prompts, true


def _simulate(sampler, true, steps, group_size=8, seed=1, record_from=0):
    """Rollouts are Bernoulli(true pass rate) draws; returns the sampled ids per step from ``record_from`` on."""
    rng, batches = random.Random(seed), []
    for step in range(steps):
        batch = sampler.next()
        ids = [p.prompt_id for p in batch for _ in range(group_size)]
        if hasattr(sampler, "update"):
            sampler.update(ids, [rng.random() < true[i] for i in ids])
        if step >= record_from:
            batches.append([p.prompt_id for p in batch])
    return batches


def test_tracker_posterior_mean_with_decay_against_direct_formula():
    tracker = PassRateTracker(prior=0.4, prior_strength=3.0, decay=0.5)
    assert tracker.estimate("a") == pytest.approx(0.4) and not tracker.seen("a")
    tracker.update(["a", "a", "b", "a"], [1, 0, 1, True])
    tracker.update(["a", "a"], [0.0, 0.0])
    # a: batch 1 -> s=2, n=3; batch 2 -> s = 0.5*2 + 0 = 1, n = 0.5*3 + 2 = 3.5
    assert tracker.estimate("a") == pytest.approx((1 + 0.4 * 3) / (3.5 + 3))
    assert tracker.estimate("b") == pytest.approx((1 + 1.2) / (1 + 3))
    restored = PassRateTracker(prior=0.4, prior_strength=3.0, decay=0.5)
    restored.load_state_dict(copy.deepcopy(tracker.state_dict()))
    assert restored.estimate("a") == tracker.estimate("a") and restored.seen("b")
    with pytest.raises(ValueError, match="2 prompt ids but 1"):
        tracker.update(["a", "b"], [1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tracker.update(["a"], [2.0])
    with pytest.raises(ValueError, match=r"sampler\.tracker\.decay"):
        PassRateTracker(decay=0.0)


def test_band_sampler_focuses_on_the_band_and_beats_uniform():
    prompts, true = _prompts()
    in_band = lambda batches: sum(0.3 <= true[i] <= 0.7 for b in batches for i in b) / sum(len(b) for b in batches)
    band = BandSampler(prompts, 16, seed=0, low=0.3, high=0.7)
    band_share = in_band(_simulate(band, true, steps=300, record_from=150))
    uniform_share = in_band(_simulate(PromptSampler(prompts, 16, seed=0), true, steps=300, record_from=150))
    print(f"in-band share after warm-up: band sampler {band_share:.3f}, uniform {uniform_share:.3f}")
    assert band_share >= 0.9
    assert uniform_share < 0.5  # the band holds 40% of the prompts
    metrics = band.metrics()
    assert metrics["sampler/seen_fraction"] == 1.0  # exploration reached every prompt


def test_band_sampler_explores_unseen_prompts_first():
    prompts, true = _prompts(n=200)
    sampler = BandSampler(prompts, 20, seed=3, low=0.4, high=0.6, explore=0.25, refresh=0.0)
    seen_before: set[str] = set()
    for batch in _simulate(sampler, true, steps=10):
        new = [i for i in batch if i not in seen_before]
        assert len(set(batch)) == len(batch) == 20
        if len(seen_before) < 200 - 5:
            assert len(new) >= 5  # round(0.25 * 20) explore slots while unseen prompts remain
        seen_before.update(batch)


def test_schedule_by_meta_key_moves_from_easy_to_hard():
    prompts, true = _prompts()
    level = {p.prompt_id: p.meta["difficulty"]["level"] for p in prompts}
    sampler = ScheduleSampler(prompts, 16, seed=0, total_steps=40, key="difficulty.level", window=0.25)
    batches = _simulate(sampler, true, steps=41)
    means = [sum(level[i] for i in b) / len(b) for b in batches]
    assert all(level[i] == 1 for i in batches[0])  # the easiest quarter of the ranking
    assert all(level[i] == 4 for i in batches[-1])  # the hardest quarter
    quarters = [sum(means[q * 10 : (q + 1) * 10]) / 10 for q in range(4)]
    assert quarters == sorted(quarters) and quarters[-1] - quarters[0] > 2.0
    harder_first = ScheduleSampler(prompts, 16, seed=0, total_steps=40, key="difficulty.level", easier="higher", window=0.25)
    assert all(p.meta["difficulty"]["level"] == 4 for p in harder_first.next())


def test_schedule_by_tracked_pass_rate_moves_from_easy_to_hard():
    prompts, true = _prompts()
    sampler = ScheduleSampler(prompts, 16, seed=0, total_steps=300, start_pass_rate=0.8, end_pass_rate=0.2, width=0.2)
    batches = _simulate(sampler, true, steps=300)
    mean_true = lambda bs: sum(true[i] for b in bs for i in b) / sum(len(b) for b in bs)
    early, late = mean_true(batches[40:80]), mean_true(batches[260:300])  # targets: about 0.68 and 0.25
    print(f"mean true pass rate of sampled prompts: steps 40-80 {early:.2f}, steps 260-300 {late:.2f}")
    assert early > 0.55 and late < 0.35 and early - late > 0.3
    assert sampler.band() == pytest.approx((0.1, 0.3))


@pytest.mark.parametrize("make", [
    lambda p: BandSampler(p, 16, seed=5, low=0.3, high=0.7),
    lambda p: ScheduleSampler(p, 16, seed=5, total_steps=30, key="difficulty.level"),
    lambda p: ScheduleSampler(p, 16, seed=5, total_steps=30),
], ids=["band", "schedule_key", "schedule_pass_rate"])
def test_state_round_trip_reproduces_the_sequence(make):
    prompts, true = _prompts(n=120)
    sampler = make(prompts)
    _simulate(sampler, true, steps=12, seed=7)
    state = copy.deepcopy(sampler.state_dict())
    continued = _simulate(sampler, true, steps=10, seed=8)
    resumed = make(prompts)
    resumed.load_state_dict(state)
    assert _simulate(resumed, true, steps=10, seed=8) == continued
    fresh_a, fresh_b, other_seed = make(prompts), make(prompts), make(prompts)
    other_seed.seed = 6
    assert _simulate(fresh_a, true, 5) == _simulate(fresh_b, true, 5)
    assert _simulate(other_seed, true, 5) != _simulate(make(prompts), true, 5)


def test_bad_settings_name_the_key():
    prompts, _ = _prompts(n=40)
    with pytest.raises(ValueError, match=r"sampler\.low=0\.8 > sampler\.high=0\.2"):
        BandSampler(prompts, 8, 0, low=0.8, high=0.2)
    with pytest.raises(ValueError, match=r"sampler\.explore"):
        BandSampler(prompts, 8, 0, explore=1.5)
    with pytest.raises(KeyError, match=r"sampler\.key='difficulty\.digits'.*'digits'"):
        ScheduleSampler(prompts, 8, 0, total_steps=10, key="difficulty.digits")
    with pytest.raises(ValueError, match=r"sampler\.window"):
        ScheduleSampler(prompts, 8, 0, total_steps=10, key="difficulty.level", window=0.1)
    with pytest.raises(ValueError, match=r"rollout\.prompts_per_step"):
        BandSampler(prompts, 41, 0)
    with pytest.raises(ValueError, match="appears more than once"):
        BandSampler(prompts + prompts[:1], 8, 0)


@pytest.mark.parametrize("name, cls", [("uniform", PromptSampler), ("band", BandSampler), ("schedule", ScheduleSampler)])
def test_sampler_config_group_instantiates(name, cls):
    prompts, _ = _prompts(n=64)
    root = OmegaConf.merge({"trainer": {"max_steps": 20}}, {"sampler": OmegaConf.load(SAMPLER_CONFIGS / f"{name}.yaml")})
    sampler = instantiate(root.sampler, prompts=prompts, batch_size=8, seed=0)
    assert type(sampler) is cls
    assert len(sampler.next()) == 8 and isinstance(sampler.state_dict(), dict)
    if name == "schedule":
        assert sampler.total_steps == 20 and isinstance(sampler.tracker, PassRateTracker)
