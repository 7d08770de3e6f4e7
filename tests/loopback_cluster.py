"""A two-node Ray cluster on one machine, the tests' stand-in for a multi-node cluster.

The head (node_a) and a second node (node_b) each run ``ray start --block`` with their own loopback address and a
custom resource that pins actors to them (``{"resources": {"node_a": 1}}``). Not 127.0.0.1: Ray rewrites
"127.0.0.1" and "localhost", given to ``ray start --node-ip-address/--address`` or ``ray.init(address=)``, into
the machine's outward address (``ray._private.services.resolve_ip_for_localhost``), so a node started there
reports and is reached at e.g. 192.0.2.2. Other 127.0.0.0/8 addresses are kept as given and route to ``lo``.

Stopping touches only what was started here: each ``ray start --block`` gets a SIGTERM (Ray then ends exactly the
processes of its node), and any descendant still alive after that is killed by pid. Never ``ray stop``, which
ends every Ray process on the machine, another test run's included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

NODES = {"node_a": "127.0.0.2", "node_b": "127.0.0.3"}  # resource name -> node address; node_a is the head


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LoopbackCluster:
    address: str  # the head's GCS, host:port
    temp_dir: str
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # node name -> its `ray start --block`

    def log(self, node: str) -> str:
        return Path(self.temp_dir, f"{node}.log").read_text(errors="replace")[-3000:]


def _start_node(cluster: LoopbackCluster, name: str, head_port: int | None) -> None:
    ray = str(Path(sys.executable).with_name("ray"))
    ip = NODES[name]
    role = ["--head", f"--port={head_port}", f"--ray-client-server-port={free_port(ip)}", "--include-dashboard=false",
            "--disable-usage-stats"] if head_port else [f"--address={cluster.address}"]
    command = [ray, "start", "--block", *role, f"--node-ip-address={ip}", "--num-cpus=2", "--num-gpus=0",
               f"--resources={json.dumps({name: 10})}", f"--temp-dir={cluster.temp_dir}", "--object-store-memory=200000000",
               # the default ports are fixed (worker ports 10002-19999, agent 52365): another Ray on this machine,
               # or the other node, may hold them
               "--min-worker-port=0", "--max-worker-port=0", f"--dashboard-agent-listen-port={free_port(ip)}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(Path(cluster.temp_dir, f"{name}.log"), "ab") as log:
        cluster.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait(what: str, cluster: LoopbackCluster, ready, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        for name, process in cluster.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"`ray start` of {name} exited with {process.returncode}:\n{cluster.log(name)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s:.0f} s:\n" + "\n".join(cluster.log(n) for n in cluster.processes))
        time.sleep(0.5)


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _stop(cluster: LoopbackCluster, timeout_s: float = 60) -> None:
    import psutil

    started = []
    for process in cluster.processes.values():
        try:
            started += psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for process in reversed(list(cluster.processes.values())):  # the second node first, then the head
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    _, alive = psutil.wait_procs(started, timeout=10)
    for p in alive:  # psutil checks the pid still belongs to the process seen above before it signals
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@contextmanager
def loopback_cluster(timeout_s: float = 120):
    """Start the two nodes, connect this process to the head (``ray.init``), yield the ``LoopbackCluster``; on exit
    disconnect and stop both nodes. Fails if a node reports an address outside 127.0.0.0/8."""
    import ray

    ray.shutdown()  # a test module before may have left its own local instance
    temp_dir = tempfile.mkdtemp(prefix="rp2n_", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    head_ip = NODES["node_a"]
    port = free_port(head_ip)
    cluster = LoopbackCluster(f"{head_ip}:{port}", temp_dir)
    try:
        _start_node(cluster, "node_a", port)
        _wait("the head's GCS", cluster, lambda: _listening(head_ip, port), timeout_s)
        _start_node(cluster, "node_b", None)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address=cluster.address, log_to_driver=False)
        _wait("both nodes", cluster, lambda: sum(n["Alive"] for n in ray.nodes()) == len(NODES), timeout_s)
        addresses = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
        if addresses != sorted(NODES.values()):
            raise RuntimeError(f"the nodes report addresses {addresses}, expected {sorted(NODES.values())} (loopback)")
        yield cluster
    finally:
        ray.shutdown()
        _stop(cluster)
        shutil.rmtree(temp_dir, ignore_errors=True)
