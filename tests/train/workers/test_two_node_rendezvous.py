"""Trainer ranks on two Ray nodes (a two-node cluster on loopback addresses, tests/loopback_cluster.py) meet at the
address rank 0 publishes, and their update equals the single-process one."""

import ipaddress
import os
import socket
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_model_path
from tests.loopback_cluster import NODES
from tests.train.workers.test_policy_trainer_zero import (
    TRAINER,
    _batches,
    _max_error,
    _policy_gradient,
)

ray = pytest.importorskip("ray")


def on(node: str) -> dict:
    return {"num_cpus": 1, "resources": {node: 1}}


def tcp_peers(actor) -> set[tuple[str, int]]:
    """The remote ends of the actor process's TCP connections (it runs on this machine: the cluster is local)."""
    import psutil

    def ipv4(ip: str) -> str:  # a dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d
        address = ipaddress.ip_address(ip)
        return str(getattr(address, "ipv4_mapped", None) or address)

    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    return {(ipv4(c.raddr.ip), c.raddr.port) for c in psutil.Process(pid).net_connections(kind="tcp") if c.raddr}


@ray.remote(num_cpus=0)
def where() -> tuple[str, str]:
    import train

    return ray.util.get_node_ip_address(), train.__file__


def test_every_node_reports_a_loopback_address_and_runs_this_checkout(two_node_ray):
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert sorted(n["NodeManagerAddress"] for n in nodes) == sorted(NODES.values())
    assert all(ipaddress.ip_address(n["NodeManagerAddress"]) in ipaddress.ip_network("127.0.0.0/8") for n in nodes)
    assert two_node_ray.address.startswith(NODES["node_a"] + ":")
    for name, address in NODES.items():
        node_address, train_file = ray.get(where.options(resources={name: 0.01}).remote())
        assert node_address == address
        assert Path(train_file).is_relative_to(REPO)  # workers import the code under test, not another checkout


@pytest.mark.parametrize("rank0_node, rank1_node, stage", [("node_a", "node_b", 1), ("node_b", "node_a", 3)],
                         ids=["rank0-on-head-zero1", "rank0-on-second-node-zero3"])
def test_ranks_on_two_nodes_meet_at_rank0s_address_and_match_one_process(two_node_ray, model_cache, tiny_tokenizer,
                                                                         rank0_node, rank1_node, stage):
    """Rank 1 joins the store at the address rank 0 published: rank 0's Ray node address (which differs with the
    placement, so it cannot be a constant) and a port rank 0 chose and listens on; rank 1's process holds a TCP
    connection to exactly that address, and every connection of both ranks is on loopback. The gradients equal the
    single-process ones within 1e-5 of each tensor's largest entry (the bound of test_policy_trainer_zero.py)."""
    from train.workers.actors import TrainerGroup
    from train.workers.policy_trainer import network_interface

    path = tiny_model_path(model_cache, seed=5)
    batches, extras, normaliser = _batches(tiny_tokenizer)
    loss = partial(_policy_gradient, normaliser=normaliser)

    single = TrainerGroup(1, path, "sdpa", {**TRAINER, "zero_stage": 0}, micro_batches_per_rank=4, rank_options=[on("node_a")])
    single.train_step(batches, loss, extras, keep_gradients=True)
    want = single.gradients()
    single.shutdown()

    group = TrainerGroup(2, path, "sdpa", {**TRAINER, "zero_stage": stage}, micro_batches_per_rank=2,
                         rank_options=[on(rank0_node), on(rank1_node)])
    try:
        address, port = group.rendezvous
        assert address == NODES[rank0_node]  # rank 0's own node address
        with socket.create_connection((address, port), timeout=10):  # rank 0's store listens there
            pass
        rank0, rank1 = group.connections
        assert rank0["node"] == NODES[rank0_node] and rank1["node"] == NODES[rank1_node]
        assert rank1["store"] == (address, port)  # rank 1, on the other node, joined the published address
        # gloo binds to the interface of each rank's node address (lo for loopback aliases), not the hostname's
        assert rank0["gloo_interface"] == rank1["gloo_interface"] == network_interface("127.0.0.1")
        stats = group.train_step(batches, loss, extras, keep_gradients=True)
        got = group.gradients()
        peers = [tcp_peers(rank) for rank in group.ranks]
        assert (address, port) in peers[1]  # rank 1's open connection to rank 0's store
        loopback = ipaddress.ip_network("127.0.0.0/8")
        assert all(ipaddress.ip_address(ip) in loopback for ip, _ in peers[0] | peers[1]), peers  # Ray's and gloo's too
    finally:
        group.shutdown()
    assert sum(s["tokens"] for s in stats) == normaliser
    assert got.keys() == want.keys()
    for name, ref in want.items():
        assert (got[name] - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), f"ZeRO-{stage}: {_max_error(got, want)}"


def test_network_interface_of_an_address_and_of_a_loopback_alias():
    import psutil

    from train.workers.policy_trainer import network_interface

    loopback = next(name for name, addrs in psutil.net_if_addrs().items() if any(a.address == "127.0.0.1" for a in addrs))
    assert network_interface("127.0.0.1") == loopback
    assert network_interface("127.0.0.3") == loopback  # an alias no interface lists: the one whose network holds it
    assert network_interface("203.0.113.7") is None  # TEST-NET-3: on no interface
    assert network_interface("not-an-address") is None
