"""Connecting a job's driver to Ray: the cluster named by RAY_ADDRESS (as under `ray job submit`), or a
local Ray on loopback when there is none.

Local Ray gets at least MIN_LOCAL_CPUS logical CPUs: on a 2-core machine an actor pool that takes every
CPU starves Ray Data's read and write tasks and the job hangs without an error (ray-facts).
"""

from __future__ import annotations

import os

MIN_LOCAL_CPUS = 4


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect once per process; a no-op when Ray is already initialised (tests, nested jobs)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    # The dashboard (loopback only) shows a local run's progress, and Ray Train's placement-group cleaner
    # polls its state API: without it the train job logs "State API may be temporarily unavailable" every second.
    ray.init(address="local", num_cpus=num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1),
             include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1")
