"""Stop with our one line when the Ray head is lost, instead of Ray's own exit a minute later (or a hang).

When the head node dies (its GCS with it), a driver's pending ``ray.get`` neither returns nor raises: Ray's core
worker retries the GCS for ``gcs_rpc_server_reconnect_timeout_s`` (60 s by default) and then ends the process
with its own message, which names neither the last good checkpoint nor the way to resume. ``ClusterWatch`` is a
daemon thread of the driver that opens a TCP connection to the GCS every ``interval_s``; once none has succeeded
for ``timeout_s`` (``cluster.head_timeout_s``, below Ray's 60 s) it prints the recipes' stop message (the step the
run stopped after, the last good checkpoint, the resume command) and ends the driver with status 1.
Checkpoints are committed by an atomic rename (train/run/checkpoint.py), so ending the process at any moment
loses only the steps after the last one. A head that comes back within ``timeout_s`` (a GCS restarted with fault
tolerance) resets the clock.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from train.workers.run_stops import stop_message


class HeadLost(RuntimeError):
    """The Ray head's GCS accepted no connection for ``cluster.head_timeout_s``."""


def gcs_reachable(address: str, timeout_s: float = 5.0) -> bool:
    """Whether a TCP connection to ``address`` (``host:port``) opens within ``timeout_s``."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


class ClusterWatch:
    """Watch the GCS at ``gcs_address`` from a daemon thread while in the ``with`` block.

    ``steps()`` is the run's last finished step (None while starting), read only when the head is lost;
    ``on_lost(message)`` ends the process (default: the message on stderr, then ``os._exit(1)``: the main thread
    may be blocked inside Ray, where no exception reaches it). ``timeout_s`` None: no watch.
    """

    def __init__(self, gcs_address: str, run_dir: Path, steps: Callable[[], int | None], timeout_s: float | None = 30.0,
                 interval_s: float = 2.0, on_lost: Callable[[str], None] | None = None):
        self.gcs_address, self.run_dir, self.steps = gcs_address, Path(run_dir), steps
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.on_lost = on_lost or _exit_with
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ray-head-watch", daemon=True)

    @classmethod
    def of_this_driver(cls, run_dir: Path, steps: Callable[[], int | None], timeout_s: float | None) -> ClusterWatch:
        """A watch of the cluster this process joined (``ray.init`` done)."""
        import ray

        return cls(ray.get_runtime_context().gcs_address, run_dir, steps, timeout_s)

    def __enter__(self) -> ClusterWatch:
        if self.timeout_s is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _watch(self) -> None:
        last_seen = time.monotonic()
        while not self._stop.wait(self.interval_s):
            if gcs_reachable(self.gcs_address, timeout_s=min(5.0, self.interval_s + 1.0)):
                last_seen = time.monotonic()
            elif time.monotonic() - last_seen >= self.timeout_s and not self._stop.is_set():
                silent = time.monotonic() - last_seen
                lost = HeadLost(f"the Ray head (GCS at {self.gcs_address}) accepted no connection for {silent:.0f} s "
                                f"(cluster.head_timeout_s={self.timeout_s:g}): its node or its GCS process died")
                self.on_lost(stop_message(lost, self.steps(), self.run_dir, fix="Start the Ray cluster again (a local one starts with the run)"))
                return


def _exit_with(message: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    os._exit(1)
