"""Connecting a job's driver to Ray: the cluster named by RAY_ADDRESS (as under `ray job submit`), or a
local Ray on loopback when there is none.

Local Ray gets at least MIN_LOCAL_CPUS logical CPUs: on a 2-core machine an actor pool that takes every
CPU starves Ray Data's read and write tasks and the job hangs without an error.

Security of the local default: Ray's token authentication stays on (Ray 2.60 turns it on for a new local
cluster unless RAY_AUTH_MODE says otherwise; the token is kept in ~/.ray/auth_token), and every Ray process
listens on 127.0.0.1 only (`loopback_only`). Without the latter Ray 2.60 resolves "127.0.0.1" to the
machine's interface address (`resolve_ip_for_localhost`): GCS, raylet, workers and agents then listen on
all interfaces and advertise that address.
"""

from __future__ import annotations

import os

MIN_LOCAL_CPUS = 4
#: Ray's switch between "cluster" and "single machine" addressing (named for the platforms where it is off by
#: default). "0": get_node_ip_address() answers 127.0.0.1, and servers bind to it. It also makes
#: `ray start --address=...` refuse to add a worker node, so it is only for single-machine Ray.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = "127.0.0.1"


def loopback_only() -> None:
    """Make the local Ray this process starts listen and advertise on 127.0.0.1 only.

    The environment variable reaches the GCS, raylet and workers that `ray.init` starts; this process read
    it when it imported ray, so the same switch is set on the already-imported constants too."""
    os.environ[LOOPBACK_ENV] = "0"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect once per process; a no-op when Ray is already initialised (tests, nested jobs)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    loopback_only()
    # The dashboard (loopback only) shows a local run's progress, and Ray Train's placement-group cleaner
    # polls its state API: without it the train job logs "State API may be temporarily unavailable" every second.
    ray.init(address="local", num_cpus=num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1),
             include_dashboard=True, dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK)


def parse_resources(text: str | None, option: str) -> tuple[tuple[str, float], ...]:
    """'{"worker_node": 1}' -> (("worker_node", 1.0),): custom Ray resources that place a job's actors or
    workers on the nodes that offer them (a frozen, hashable form for configs). CPU and GPU have their own
    options; the error names `option`."""
    import json

    if not text:
        return ()
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object of resource name -> amount, got {text!r}")
    out = []
    for name, amount in sorted(value.items()):
        if name in ("CPU", "GPU") or not name:
            raise ValueError(f"{option}: {name or 'an empty name'!r} is not a custom resource (CPU and GPU have "
                             "their own options)")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise ValueError(f"{option}: the amount of {name!r} must be a positive number, got {amount!r}")
        out.append((name, float(amount)))
    return tuple(out)
