"""An RL run with its 2 trainer ranks and 2 rollout workers spread over the two nodes of a loopback Ray cluster
(tests/loopback_cluster.py; ``cluster.bundle_strategy=STRICT_SPREAD``), weights synced by trainer rank 0's gloo
broadcast across the nodes: it completes, every actor really ran on the node its bundle names, and its metrics
equal those of the same run packed onto one node (``STRICT_PACK``) with the object-store sync."""

from contextlib import contextmanager

import pytest

from tests.loopback_cluster import NODES
from tests.train.rl.test_rl import FAST_RL, VARIED_REWARD
from train.run.config_checks import ConfigError

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("one_thread")

# fp32 on CPU: the ranks' gradients are summed by the same gloo all-reduce of the same two operands wherever the
# ranks run, and each rollout worker samples with its own seed: the metrics agree to float rounding
REL = 1e-6


def _node_of(actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda self: ray.util.get_node_ip_address()))


def recording_nodes(monkeypatch) -> dict:
    """Wrap start_actors so that the node address of every trainer rank and rollout worker is recorded."""
    from train.rl import startup

    seen: dict = {}
    start_actors = startup.start_actors

    @contextmanager
    def wrapped(*args, **kwargs):
        with start_actors(*args, **kwargs) as actors:
            seen["trainer"] = [c["node"] for c in actors.trainer.connections]  # each rank's own report
            seen["trainer_ray"] = [_node_of(r) for r in actors.trainer.ranks]
            seen["rollout"] = [_node_of(w) for w in actors.rollout_pool.workers]
            seen["broadcast"] = actors.rollout_pool.broadcast is not None
            yield actors

    monkeypatch.setattr(startup, "start_actors", wrapped)
    return seen


def _metrics(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in step.items() if not k.startswith("perf/")} for step in history]


@pytest.mark.slow  # two RL runs of 2 steps on a fresh two-node cluster
def test_rl_step_with_ranks_and_workers_on_two_nodes_matches_one_node(two_node_ray, compose, tmp_path, monkeypatch):
    from train.rl.recipe import run

    overrides = FAST_RL + VARIED_REWARD + ["trainer.world_size=2", "rollout.num_workers=2", "trainer.save_every=0",
                                           f"cluster.ray_address={two_node_ray.address}"]
    seen = recording_nodes(monkeypatch)
    one = run(compose(overrides + ["cluster.bundle_strategy=STRICT_PACK", f"run_dir={tmp_path}/one"]))
    one_nodes = dict(seen)
    # spread, and the weights go from trainer rank 0 to the workers on both nodes by the broadcast of
    # rollout.weight_sync (gloo here, the protocol of nccl on GPUs) instead of the object store
    two = run(compose(overrides + ["cluster.bundle_strategy=STRICT_SPREAD", "rollout.weight_sync=gloo",
                                   f"run_dir={tmp_path}/two"]))
    two_nodes = dict(seen)

    assert len(set(one_nodes["trainer"] + one_nodes["rollout"])) == 1  # all on one node
    assert not one_nodes["broadcast"] and two_nodes["broadcast"]
    assert two_nodes["trainer"] == two_nodes["trainer_ray"]
    assert sorted(two_nodes["trainer"]) == sorted(NODES.values())  # rank 1 on the other node than rank 0
    assert two_nodes["rollout"] == two_nodes["trainer"]  # rollout worker j in rank j's bundle: one per node
    assert two["step"] == one["step"] == 2
    assert two["history"][0]["rollout/policy_version"] == 0 and two["history"][1]["rollout/policy_version"] == 1
    assert two["history"][0]["train/grad_norm"] > 0  # the policy moved: step 2 samples synced weights
    for got, want in zip(_metrics(two["history"]), _metrics(one["history"]), strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=REL, abs=1e-9), key


@pytest.mark.parametrize("override, message", [
    (["cluster.bundle_strategy=SCATTER"], r"cluster\.bundle_strategy='SCATTER' must be one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"),
    (["cluster.bundle_strategy=STRICT_SPREAD", "cluster.placement=disaggregated"],
     r"cluster\.bundle_strategy=STRICT_SPREAD places the bundles of cluster\.placement=colocated"),
])
def test_bad_bundle_strategy_fails_before_any_work(compose, tmp_path, override, message):
    from train.rl.recipe import run

    with pytest.raises(ConfigError, match=message):
        run(compose(FAST_RL + override + [f"run_dir={tmp_path}/bad"]))
    assert not (tmp_path / "bad").exists()
