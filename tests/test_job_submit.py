"""prepare -> annotate -> score submitted as Ray jobs to a real Ray head, the way they run on a cluster.

A head started with `ray start --head` on loopback (its own temp dir and ports, so it never meets another
Ray on this machine) receives each job through Ray's job submission API with the repo as working dir (the
.venv, data and outputs left out of the upload). Data lives in the loopback S3 server under s3:// URIs; the
credentials reach the jobs only through the head's environment, as an instance profile's would on AWS,
never through the submission. The head is stopped by signalling the `ray start --block` process this test
started (`ray stop` would kill every Ray process on the machine, teammates' included).
"""

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
from pathlib import Path

import pytest

from pipeline.ray_runtime import LOOPBACK_ENV
from tests.multinode_cluster import free_ports

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
#: Left out of the working-dir upload (Ray also honours .gitignore; these make it explicit and independent).
UPLOAD_EXCLUDES = [".venv", ".git", "data", "outputs", "**/__pycache__", ".pytest_cache", ".ruff_cache"]
HEAD_CPUS = 4  # >= 4 logical CPUs so a model actor never starves Ray Data's reads and writes
NUM_IMAGES = 8
HEAD_START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 600  # generous: a shared 2-core CI machine can be many times oversubscribed
POLL_S = 1.0


@pytest.fixture
def ray_head(s3):
    """A Ray head on 127.0.0.1 with its own temp dir; yields the dashboard (job submission) address."""
    gcs, dashboard, client, agent = free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", LOOPBACK_ENV: "0",
           # The jobs' `python` is this virtualenv's, as the cluster image's python is on a real cluster.
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    address = f"http://127.0.0.1:{dashboard}"
    with open(os.path.join(temp_dir, "ray-start.log"), "wb") as log:
        head = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
             "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent}", f"--num-cpus={HEAD_CPUS}", "--num-gpus=0",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_dashboard(address, head, temp_dir)
            yield address
        finally:
            stop_head(head)
            shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_dashboard(address: str, head: subprocess.Popen, temp_dir: str) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while True:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}: "
                               + Path(temp_dir, "ray-start.log").read_text(errors="replace")[-3000:])
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:  # dashboard still starting
            if time.monotonic() > deadline:
                raise
            time.sleep(POLL_S)


def stop_head(head: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` process we started: it shuts down the processes of its node."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # the session this test created for it
            head.wait(timeout=30)


def submit(client, entrypoint: str) -> str:
    """submit_job, retried while the head's dashboard agent is still registering (Ray answers 500 then) or
    when a loaded head drops the connection (seen on an oversubscribed 2-core machine). The fixed
    submission id makes the retry safe: a submission that did arrive is refused as "already exists"."""
    submission_id = f"test-{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    dropped = False
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                     runtime_env={"working_dir": str(REPO), "excludes": UPLOAD_EXCLUDES})
        except OSError:  # requests' ConnectionError (RemoteDisconnected) is one
            if time.monotonic() > deadline:
                raise
            dropped = True
        except RuntimeError as exc:
            if dropped and "already exists" in str(exc):
                return submission_id
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(POLL_S)


def run_job(client, entrypoint: str) -> str:
    """Submit `entrypoint` with the repo as working dir, wait for a terminal state, return its logs."""
    from ray.job_submission import JobStatus

    job_id = submit(client, entrypoint)
    submitted = time.monotonic()
    deadline = submitted + JOB_TIMEOUT_S
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {entrypoint!r} still {status} after {JOB_TIMEOUT_S}s:\n"
                        + client.get_job_logs(job_id)[-4000:])
        time.sleep(POLL_S)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    print(f"{entrypoint.split(' -m ')[-1].split()[0]}: {status} in {time.monotonic() - submitted:.1f}s")
    assert status == JobStatus.SUCCEEDED, f"job {entrypoint!r} ended {status}:\n{logs[-6000:]}"
    return logs


def test_prepare_annotate_score_as_submitted_jobs(ray_head, s3):
    import pyarrow.parquet as pq
    from ray.job_submission import JobSubmissionClient

    from pipeline.storage import filesystem
    from pipeline.tasks import SUMMARY_FILE

    client = JobSubmissionClient(ray_head)
    base = f"s3://{s3.bucket}/job-submit-{os.getpid()}"
    tasks, raw, predictions, report = (f"{base}/tasks", f"{base}/raw", f"{base}/annotate", f"{base}/score")
    fs, _ = filesystem(base, s3.options)

    started = time.monotonic()
    # The upload leaves the 5 GB virtualenv behind: the job's working dir has none.
    all_logs = []
    logs = run_job(client, f"test ! -e .venv && python -m jobs.prepare --format shapes "
                           f"--num-images {NUM_IMAGES} --seed 0 --root {raw} --out {tasks}")
    summary = json.loads(fs.cat(f"{tasks}/{SUMMARY_FILE}".removeprefix("s3://")))
    expressions = summary["expressions"]
    assert summary["rows"] == NUM_IMAGES and expressions > 0, logs
    all_logs.append(logs)

    logs = run_job(client, f"python -m jobs.annotate --input {tasks} --output {predictions} "
                           "--checkpoint tiny --replicas 1 --batch-size 2")
    table = pq.read_table(f"{predictions}/predictions".removeprefix("s3://"), filesystem=fs)
    assert table.num_rows == expressions, logs
    assert len(set(table.column("expression_id").to_pylist())) == expressions
    assert set(table.column("status").to_pylist()) == {"ok"}, logs
    all_logs.append(logs)

    logs = run_job(client, f"python -m jobs.score --predictions {predictions}/predictions "
                           f"--ground-truth {tasks} --out {report} --partitions 2")
    metrics = json.loads(fs.cat(f"{report}/metrics.json".removeprefix("s3://")))
    assert metrics["overall"]["count"] == expressions, logs
    assert 0.0 <= metrics["overall"]["giou"] <= 1.0
    all_logs.append(logs)
    assert not any(s3.secret in text for text in all_logs), "credentials must never reach job logs"
    print(f"prepare -> annotate -> score as Ray jobs: {time.monotonic() - started:.1f}s")
