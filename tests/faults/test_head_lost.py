"""A lost Ray head stops the driver with our one line (train/workers/cluster_watch.py), not Ray's exit 60 s later."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from train.workers.cluster_watch import ClusterWatch, gcs_reachable

REPO = Path(__file__).resolve().parents[2]


def _listener() -> tuple[socket.socket, str]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server, f"127.0.0.1:{server.getsockname()[1]}"


def test_watch_reports_a_silent_head_with_the_step_and_the_way_back(tmp_path):
    server, address = _listener()
    assert gcs_reachable(address)
    lost = []
    done = threading.Event()
    with ClusterWatch(address, tmp_path, steps=lambda: 7, timeout_s=1.0, interval_s=0.1,
                      on_lost=lambda message: (lost.append(message), done.set())):
        time.sleep(0.6)
        assert lost == []  # a head that answers is never reported
        server.close()
        silent_from = time.monotonic()
        assert done.wait(10)
    assert 0.9 <= time.monotonic() - silent_from < 5
    assert not gcs_reachable(address)
    (message,) = lost
    assert message.startswith(f"the Ray head (GCS at {address}) accepted no connection for ")
    assert "cluster.head_timeout_s=1" in message
    assert "The run stopped after step 7; the last good checkpoint is none (no checkpoint was saved yet)." in message
    assert f"run_dir={tmp_path} and trainer.resume=auto" in message


def test_a_head_back_within_the_timeout_is_not_reported(tmp_path):
    server, address = _listener()
    port = int(address.rsplit(":", 1)[1])
    lost = []
    with ClusterWatch(address, tmp_path, steps=lambda: None, timeout_s=1.5, interval_s=0.1, on_lost=lost.append):
        server.close()
        time.sleep(0.8)  # silent for less than the timeout
        back = socket.socket()
        back.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        back.bind(("127.0.0.1", port))
        back.listen()
        time.sleep(2.0)
    back.close()
    assert lost == []


def test_no_watch_without_a_timeout(tmp_path):
    watch = ClusterWatch("127.0.0.1:1", tmp_path, steps=lambda: None, timeout_s=None, on_lost=pytest.fail)
    with watch:
        time.sleep(0.2)
    assert not watch._thread.is_alive()


DRIVER = textwrap.dedent("""
    import sys, time
    import ray
    from train.workers.cluster_watch import ClusterWatch

    ray.init(address=sys.argv[1], log_to_driver=False)

    @ray.remote(num_cpus=1)
    def busy():
        time.sleep(600)

    with ClusterWatch.of_this_driver(sys.argv[2], lambda: 3, timeout_s=3):
        ref = busy.remote()
        print("waiting", flush=True)
        ray.get(ref)  # blocks in Ray's core worker when the head dies
""")


@pytest.mark.slow
def test_a_killed_head_stops_a_driver_blocked_in_ray_get(tmp_path):
    """A real one-node Ray cluster (a loopback head); every process of the head node SIGKILLed while the driver
    waits in ``ray.get``: the driver ends with status 1 and our line within seconds, not Ray's exit after 60 s."""
    from tests.loopback_cluster import (
        NODES,
        LoopbackCluster,
        _listening,
        _start_node,
        _stop,
        _wait,
        free_port,
    )

    ip = NODES["node_a"]
    port = free_port(ip)
    cluster = LoopbackCluster(f"{ip}:{port}", tempfile.mkdtemp(prefix="rphl_", dir="/tmp"))
    driver = None
    try:
        _start_node(cluster, "node_a", port)
        _wait("the head's GCS", cluster, lambda: _listening(ip, port), 180)
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, cluster.address, str(tmp_path)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                                       "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"})
        assert driver.stdout.readline().strip() == "waiting", driver.stderr.read()
        time.sleep(1.0)
        head = psutil.Process(cluster.processes["node_a"].pid)
        for process in [head, *head.children(recursive=True)]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        killed = time.monotonic()
        status = driver.wait(timeout=45)  # Ray alone would end it after its 60 s GCS reconnect timeout
        ended_after = time.monotonic() - killed
        errors = driver.stderr.read()
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        _stop(cluster)
    assert status == 1
    assert 1 <= ended_after < 30, ended_after  # timeout_s=3 from the last answer (probes every 2 s)
    line = [line for line in errors.splitlines() if line.startswith("error: ")][-1]
    assert line.startswith(f"error: the Ray head (GCS at {cluster.address}) accepted no connection for ")
    assert "The run stopped after step 3" in line and "trainer.resume=auto" in line
