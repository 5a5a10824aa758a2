"""Real process kills: a model replica SIGKILLed mid-run (Ray restarts it and re-runs its batch), and the
whole job SIGKILLed after its first input file completes (a re-run with the same --output resumes).
Either way every expression ends with exactly one row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from jobs.annotate import main
from pipeline.annotate.run import run
from tests.test_annotate_support import (
    config,
    expression_count,
    kill_once_stage,
    read_predictions,
    shapes_rows,
    write_shards,
)

REPO = Path(__file__).resolve().parents[1]
#: Wall-clock bounds of the killed job: generous, the 2-core CI machine is shared.
JOB_START_TIMEOUT_S, POLL_S = 240, 0.05


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_rows(tmp_path_factory.mktemp("shapes"), 16)


def ids(table) -> Counter:
    return Counter(zip(table.column("image_id").to_pylist(), table.column("expression_id").to_pylist()))


@pytest.mark.slow
def test_killed_replica_is_restarted_and_nothing_is_lost_or_duplicated(ray_local, shapes, tmp_path):
    write_shards(shapes[:8], tmp_path / "tasks", 4)
    marker = tmp_path / "killed"
    summary = run(config(tmp_path / "tasks", tmp_path / "out"), predict_cls=kill_once_stage(marker))
    assert marker.exists(), "the replica was never killed"
    table = read_predictions(tmp_path / "out")
    expected = Counter((r["image_id"], e["expression_id"]) for r in shapes[:8] for e in r["expressions"])
    assert ids(table) == expected  # each exactly once
    assert summary.ok and summary.rows == expression_count(shapes[:8]) and summary.errors == 0


@pytest.mark.slow
def test_killed_job_resumes_without_duplicates(ray_local, shapes, tmp_path):
    write_shards(shapes, tmp_path / "tasks", 2)  # 8 input files: the kill lands between files
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "tasks"), "--output", str(out), "--checkpoint", "tiny",
            "--replicas", "1", "--batch-size", "1", "--cpus-per-replica", "0.5", "--decode-tasks", "2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.annotate", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    def finished_files() -> int:
        return len(list((out / "done").glob("*.json"))) if (out / "done").exists() else 0

    try:
        deadline = time.monotonic() + JOB_START_TIMEOUT_S
        while finished_files() == 0:
            assert proc.poll() is None, "the job ended before its first input file completed"
            assert time.monotonic() < deadline, "no input file completed in time"
            time.sleep(POLL_S)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
        proc.wait()
    assert 1 <= finished_files() < 8, "the kill did not land mid-run"

    assert main(args) == 0  # resume in this process, on the test's own Ray cluster
    table = read_predictions(out)
    expected = Counter((r["image_id"], e["expression_id"]) for r in shapes for e in r["expressions"])
    assert ids(table) == expected
    assert finished_files() == 8
    assert not list((out / "_staging").rglob("*.parquet"))
