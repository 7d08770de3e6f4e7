"""SFT with its 2 trainer ranks on the two nodes of a loopback Ray cluster (tests/loopback_cluster.py): the run
completes and its losses equal those of the same run with both ranks on one node."""

import pytest

from tests.loopback_cluster import NODES

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # ~50-110 s: two SFT runs on a fresh two-node cluster

OVERRIDES = [
    "experiment=quickstart",
    "trainer.max_steps=4",
    "trainer.warmup_steps=1",
    "trainer.lr=2e-2",
    "trainer.row_tokens=256",
    "data.max_seq_len=256",
    "trainer.rows_per_micro_batch=1",
    "trainer.grad_accum=2",
    "trainer.world_size=2",
    "trainer.zero_stage=1",
    "trainer.eval_every=0",
    "trainer.save_every=0",
    "trainer.resume=null",
    "data.synthetic.train.num_samples=100",
    "data.synthetic.eval.num_samples=2",
    "rollout.max_new_tokens=4",
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
