"""A real two-node Ray cluster on this machine (tests/multinode_cluster.py: head + worker node, both on
127.0.0.1), jobs submitted through Ray's job API with the repo as working dir and all data in S3:
prepare -> annotate (replicas on the worker node by a custom resource) -> score, and a short train whose
workers run there too. Mid-annotate, with the writer held after 2 of 8 files, the worker node's raylet is
SIGKILLed and a new worker node started; the same job finishes with every expression exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import psutil
import pytest

from pipeline.ray_runtime import LOOPBACK, LOOPBACK_ENV
from tests.multinode_cluster import WORKER_RESOURCE
from tests.test_job_submit import REPO, run_job, submit, wait_for_dashboard

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 240  # wall-clock bounds only, generous for a shared 2-core machine
JOB_TIMEOUT_S = 900
POLL_S = 0.5
NUM_IMAGES, ROWS_PER_FILE = 16, 2
ON_WORKER = json.dumps({WORKER_RESOURCE: 1})


@pytest.fixture
def two_nodes(s3, hold, tmp_path):
    """The cluster runner in its own session; yields (info, control folder)."""
    control = tmp_path / "control"
    control.mkdir()
    temp = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", LOOPBACK_ENV: "0",
           "RAY_TMPDIR": temp, **hold.env(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    with open(tmp_path / "cluster.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tests.multinode_cluster", str(control)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    info_path = control / "info.json"
    try:
        wait_for_file(info_path, lambda: proc.poll() is None, tmp_path / "cluster.log")
        info = json.loads(info_path.read_text())
        wait_for_dashboard(info["dashboard"], proc, str(tmp_path))
        yield info, control, proc
    finally:
        info_path.unlink(missing_ok=True)  # the runner shuts the cluster down
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def wait_for_file(path: Path, alive, log: Path | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not path.exists():
        assert alive(), f"ended before {path.name}:\n" + (log.read_text(errors="replace")[-3000:] if log else "")
        assert time.monotonic() < deadline, f"no {path.name} within {START_TIMEOUT_S} s"
        time.sleep(POLL_S)


def listeners_beyond_loopback(root: subprocess.Popen) -> list[tuple]:
    beyond = []
    parent = psutil.Process(root.pid)
    for p in [parent] + parent.children(recursive=True):
        try:
            beyond += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                       if c.status == psutil.CONN_LISTEN and c.laddr.ip not in (LOOPBACK, "::ffff:127.0.0.1", "::1")]
        except psutil.Error:
            pass
    return beyond


def test_two_node_cluster_on_loopback_survives_a_lost_worker_node(two_nodes, s3, hold):
    import pyarrow.parquet as pq
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    from pipeline.storage import filesystem
    from pipeline.tasks import SUMMARY_FILE

    info, control, runner = two_nodes
    client = JobSubmissionClient(info["dashboard"])
    nodes = list_nodes(address=info["dashboard"], detail=True)
    assert len(nodes) == 2 and {n.node_ip for n in nodes} == {LOOPBACK}, nodes
    assert info["gcs"].startswith(f"{LOOPBACK}:")
    assert not listeners_beyond_loopback(runner)
    workers_before = {n.node_id for n in nodes if WORKER_RESOURCE in n.resources_total}

    base = f"s3://{s3.bucket}/two-nodes-{uuid.uuid4().hex[:8]}"
    tasks, predictions, report, train = f"{base}/tasks", f"{base}/annotate", f"{base}/score", f"{base}/train"
    fs, _ = filesystem(base, s3.options)
    run_job(client, f"python -m jobs.prepare --format shapes --num-images {NUM_IMAGES} --seed 0 --root {base}/raw "
                    f"--out {tasks} --rows-per-file {ROWS_PER_FILE}")
    expressions = json.loads(fs.cat(f"{tasks}/{SUMMARY_FILE}".removeprefix("s3://")))["expressions"]

    hold.arm(after_files=2)
    annotate = (f"python -m jobs.annotate --input {tasks} --output {predictions} --checkpoint tiny --replicas 1 "
                f"--batch-size 1 --cpus-per-replica 1 --replica-resources '{ON_WORKER}'")
    job_id = submit(client, annotate)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        hold.wait_until_held(lambda: not client.get_job_status(job_id).is_terminal(), JOB_TIMEOUT_S)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the job's log ends:\n{client.get_job_logs(job_id)[-4000:]}") from None
    (control / "kill-worker").write_text("")
    wait_for_file(control / "worker-killed", lambda: runner.poll() is None)
    (control / "start-worker").write_text("")
    wait_for_file(control / "worker-started", lambda: runner.poll() is None)
    hold.release()
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-4000:]
        time.sleep(POLL_S)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-6000:]
    fs.invalidate_cache()
    table = pq.read_table(f"{predictions}/predictions".removeprefix("s3://"), filesystem=fs)
    pairs = Counter(zip(table.column("image_id").to_pylist(), table.column("expression_id").to_pylist()))
    assert len(pairs) == expressions and set(pairs.values()) == {1}  # every expression exactly once
    assert set(table.column("status").to_pylist()) == {"ok"}

    run_job(client, f"python -m jobs.score --predictions {predictions}/predictions --ground-truth {tasks} "
                    f"--out {report} --partitions 2")
    assert json.loads(fs.cat(f"{report}/metrics.json".removeprefix("s3://")))["overall"]["count"] == expressions
    run_job(client, f"python -m jobs.train --data {tasks} --output {train} --preset tiny --max-steps 2 "
                    f"--batch-size 2 --shuffle-buffer 4 --warmup-steps 1 --workers 1 --cpus-per-worker 1 "
                    f"--worker-resources '{ON_WORKER}'")

    nodes = list_nodes(address=info["dashboard"], detail=True)
    assert {n.node_ip for n in nodes} == {LOOPBACK}
    worker_nodes = {n.node_id for n in nodes if WORKER_RESOURCE in n.resources_total}
    assert len(worker_nodes - workers_before) == 1, "a new worker node should have replaced the killed one"
    actors = list_actors(address=info["dashboard"], detail=True, limit=10000)
    placed = {a.class_name: set() for a in actors}
    for a in actors:
        placed[a.class_name].add(a.node_id)
    replicas = set().union(*(v for k, v in placed.items() if "PredictStage" in k))
    trainers = set().union(*(v for k, v in placed.items() if "TrainWorker" in k))
    assert replicas and replicas <= worker_nodes, placed  # before and after the kill: only on worker nodes
    assert trainers and trainers <= worker_nodes, placed
    assert not listeners_beyond_loopback(runner)
