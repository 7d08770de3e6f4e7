"""SFT with its 2 trainer ranks on the two nodes of a loopback Ray cluster (tests/loopback_cluster.py): the run
completes and its losses equal those of the same run with both ranks on one node."""

import pytest

from tests.loopback_cluster import NODES
from tests.train.sft.test_sft_ranks import FAST

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # ~50-110 s: two SFT runs on a fresh two-node cluster

# test_sft_ranks.py's fast 2-rank SFT, 4 steps under ZeRO-1 on a small data set
OVERRIDES = FAST + [
    "trainer.max_steps=4",
    "trainer.warmup_steps=1",
    "trainer.zero_stage=1",
    "trainer.save_every=0",
    "data.synthetic.train.num_samples=100",
]


def on(node: str) -> dict:
    return {"num_cpus": 1, "resources": {node: 1}}


def test_sft_with_ranks_on_two_nodes_matches_one_node(two_node_ray, compose, tmp_path):
    from train.sft.recipe import run

    one_node = run(compose(OVERRIDES + [f"run_dir={tmp_path}/one"]), rank_options=[on("node_a"), on("node_a")])
    two_nodes = run(compose(OVERRIDES + [f"run_dir={tmp_path}/two"]), rank_options=[on("node_a"), on("node_b")])
    assert len(two_nodes["losses"]) == 4 and two_nodes["checkpoint"].endswith("step_4")
    # a sum of two ranks' gradients is the same sum wherever the ranks run
    assert two_nodes["losses"] == pytest.approx(one_node["losses"], rel=1e-6)
    assert one_node["trainer_nodes"] == [NODES["node_a"]] * 2
    assert two_nodes["trainer_nodes"] == [NODES["node_a"], NODES["node_b"]]  # rank 1 joined rank 0 across nodes
