"""Starting Ray for a driver: join the cluster at an address, or start a local one on this machine's cores."""

from __future__ import annotations

import os

TASK_EVENTS_KEPT = 1000  # task events a local GCS keeps (Ray's default: 100,000); slurm/ sets the same for clusters


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
        # the GCS keeps the last 100,000 task events by default (for the dashboard's state API, off here): ~3 MiB
        # of its memory per 1,000 actor calls, so a long run's GCS grows for hours; 1,000 are enough to debug with
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 _system_config={"task_events_max_num_task_in_gcs": TASK_EVENTS_KEPT})


def object_refs_held() -> int:
    """Object references this process holds (Ray's reference table of the driver's core worker): flat over a
    healthy run, growing when refs are kept by mistake (then the objects stay in the object store too)."""
    import ray

    return len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())
