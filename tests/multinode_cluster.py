"""A two-node Ray cluster on this machine, every node on 127.0.0.1, run in its own process for a test.

    python -m tests.multinode_cluster CONTROL_DIR

Why ray.cluster_utils.Cluster and not two `ray start` processes: Ray 2.60's `ray start` (and `ray.init`)
turn `--node-ip-address=127.0.0.1` into the machine's interface address (`resolve_ip_for_localhost`), and
with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the switch that keeps addresses on loopback, `ray start` refuses
to add a worker node. Cluster starts each node from its parameters directly, so both nodes advertise and
listen on 127.0.0.1; the switch is set too, so that job drivers and clients resolve loopback to loopback.

The head (no custom resource) runs the dashboard, job drivers and Ray Data's read/decode/write tasks; the
worker node offers WORKER_RESOURCE, which the test's replicas and train workers ask for. Control, by files
in CONTROL_DIR: the runner writes `info.json` when both nodes are up; `kill-worker` -> the worker node's
raylet is SIGKILLed (its workers die with it), `worker-killed` written; `start-worker` -> a new worker node
with the same resources, `worker-started` written; removing `info.json` shuts the cluster down.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

WORKER_RESOURCE = "worker_node"
HEAD_CPUS, WORKER_CPUS = 4, 4
POLL_S = 0.1


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (other Ray clusters on this machine use Ray's fixed defaults)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def worker_args(temp_dir: str) -> dict:
    (agent,) = free_ports(1)
    return {"node_ip_address": "127.0.0.1", "num_cpus": WORKER_CPUS, "resources": {WORKER_RESOURCE: 100},
            "temp_dir": temp_dir, "dashboard_agent_listen_port": agent}


def raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def main(control: Path) -> None:
    from ray.cluster_utils import Cluster

    from pipeline.ray_runtime import LOOPBACK, loopback_only

    loopback_only()
    temp_dir = os.path.join(os.environ.get("RAY_TMPDIR") or "/tmp", "ray")  # where Ray's own files expect it
    os.makedirs(temp_dir, exist_ok=True)
    gcs, dashboard_port, agent, client = free_ports(4)
    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": LOOPBACK, "gcs_server_port": gcs, "num_cpus": HEAD_CPUS, "include_dashboard": True,
        "dashboard_host": LOOPBACK, "dashboard_port": dashboard_port, "dashboard_agent_listen_port": agent,
        "ray_client_server_port": client, "temp_dir": temp_dir})
    worker = cluster.add_node(**worker_args(temp_dir))
    cluster.wait_for_nodes()
    info = control / "info.json"
    tmp = control / "info.json.tmp"
    tmp.write_text(json.dumps({"gcs": cluster.address, "dashboard": f"http://{LOOPBACK}:{dashboard_port}",
                               "worker_raylet_pid": raylet_pid(worker)}))
    os.replace(tmp, info)
    try:
        while info.exists():
            if (control / "kill-worker").exists() and not (control / "worker-killed").exists():
                os.kill(raylet_pid(worker), signal.SIGKILL)
                (control / "worker-killed").write_text(str(raylet_pid(worker)))
            if (control / "start-worker").exists() and not (control / "worker-started").exists():
                worker = cluster.add_node(**worker_args(temp_dir))
                (control / "worker-started").write_text(str(raylet_pid(worker)))
            time.sleep(POLL_S)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
