"""Starting Ray for a driver: join the cluster at an address, or start a local one on this machine's cores."""

from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """``ray.init`` unless this process already has: at ``address`` (``auto``, ``ray://...``) when given, else a
    local instance of ``num_cpus`` CPUs (default: all cores) without the dashboard. Worker output stays in Ray's
    log files (``log_to_driver=False``)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray starts its workers at nice 15 by default, below this driver: on a machine shared with other work the
    # trainer ranks then starve (an SFT step of the quickstart took 7 s instead of 0.1 s under load). A local
    # instance runs them at the driver's priority; a cluster started elsewhere keeps its own setting.
    if not address:
        os.environ.setdefault("RAY_worker_niceness", "0")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
