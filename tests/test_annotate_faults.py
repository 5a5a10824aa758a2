"""Real faults, each injected at a known point: a model replica SIGKILLed on its second batch (Ray restarts
it and re-runs its batch); and, with the writer held after N complete input files (pipeline.annotate.hold),
the whole job SIGKILLed, the S3 server stopped, the disk filled. Each ends in one clear line and a
documented exit status, and the same command run again completes every expression exactly once with
nothing left in the output's staging area."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.annotate import EXIT_STORAGE, main
from pipeline.annotate.run import run
from pipeline.lease import LEASE_FILE
from pipeline.schemas import TASK_SCHEMA
from pipeline.storage import files_under, filesystem
from tests.test_annotate_support import (
    JobThread,
    config,
    expression_count,
    job_args,
    kill_once_stage,
    read_predictions,
    shapes_rows,
    write_shards,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
#: Wall-clock bounds only (never what the test waits for): generous, the 2-core CI machine is shared.
JOB_TIMEOUT_S = 300
FILES, IMAGES_PER_FILE = 8, 2


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_rows(tmp_path_factory.mktemp("shapes"), FILES * IMAGES_PER_FILE)


def ids(table) -> Counter:
    return Counter(zip(table.column("image_id").to_pylist(), table.column("expression_id").to_pylist()))


def expected_ids(rows) -> Counter:
    return Counter((r["image_id"], e["expression_id"]) for r in rows for e in r["expressions"])


def assert_complete_and_clean(fs, out: str, shapes) -> None:
    """Every expression exactly once, every file marked done, no staging leftovers, no lease."""
    fs.invalidate_cache()
    files = sorted(p for p in fs.ls(f"{out}/predictions", detail=False) if p.endswith(".parquet"))
    table = pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in files])
    assert ids(table) == expected_ids(shapes)
    assert len([p for p in fs.ls(f"{out}/done", detail=False) if p.endswith(".json")]) == FILES
    assert not files_under(fs, f"{out}/_staging"), files_under(fs, f"{out}/_staging")
    if "file" in fs.protocol:
        assert not fs.exists(f"{out}/_staging")  # (an S3 store with real folders may list an empty prefix)
    assert not fs.exists(f"{out}/{LEASE_FILE}")


def one_job_line(err: str, cause: str) -> str:
    """The job's one line, and `cause` reported nowhere else (no traceback repeats it). Unrelated Ray
    internals may log meanwhile (e.g. its stats actor's "Unhandled error" after a failed dataset)."""
    lines = [line for line in err.splitlines() if line.startswith("annotate:")]
    assert len(lines) == 1, err[-3000:]
    assert cause.lower() in lines[0].lower(), lines[0]
    assert err.lower().count(cause.lower()) == 1, err[-3000:]
    return lines[0]


def test_killed_replica_is_restarted_and_nothing_is_lost_or_duplicated(ray_local, shapes, tmp_path):
    write_shards(shapes[:8], tmp_path / "tasks", 4)
    marker = tmp_path / "killed"
    summary = run(config(tmp_path / "tasks", tmp_path / "out"), predict_cls=kill_once_stage(marker))
    assert marker.exists(), "the replica was never killed"
    table = read_predictions(tmp_path / "out")
    assert ids(table) == expected_ids(shapes[:8])  # each exactly once
    assert summary.ok and summary.rows == expression_count(shapes[:8]) and summary.errors == 0


def test_killed_job_resumes_without_duplicates(ray_local, hold, shapes, tmp_path):
    """The driver and its local Ray SIGKILLed while held after 2 of 8 files: the re-run (same process,
    so a lease left by the dead pid on this host is stale) completes exactly the rest."""
    write_shards(shapes, tmp_path / "tasks", IMAGES_PER_FILE)
    out = tmp_path / "out"
    args = job_args(str(tmp_path / "tasks"), str(out))
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **hold.env()}
    hold.arm(after_files=2)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.annotate", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        hold.wait_until_held(lambda: proc.poll() is None, JOB_TIMEOUT_S)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
        proc.wait()
    hold.reset()
    done = len(list((out / "done").glob("*.json")))
    assert 2 <= done < FILES, done  # held: no file completes after the second (concurrent finalisers aside)
    assert (out / LEASE_FILE).exists(), "the killed job's lease should still be there"

    assert main(args) == 0  # resume in this process, on the test's own Ray cluster
    fs, root = filesystem(str(out))
    assert_complete_and_clean(fs, root, shapes)


def test_s3_outage_mid_run_is_one_line_and_the_rerun_completes(ray_local, s3, hold, shapes, capfd):
    """The S3 server stopped while the writer is held after 1 of 8 files: exit 3 with one line; with the
    server back the same command, in the same process (its filesystem caches warm), exits 0."""
    fs, _ = filesystem(f"s3://{s3.bucket}", s3.options)
    base = f"{s3.bucket}/outage-{uuid.uuid4().hex[:8]}"
    for i in range(FILES):
        with fs.open(f"{base}/tasks/val-{i:05d}.parquet", "wb") as f:
            rows = shapes[i * IMAGES_PER_FILE:(i + 1) * IMAGES_PER_FILE]
            pq.write_table(pa.Table.from_pylist(rows, schema=TASK_SCHEMA), f)
    args = job_args(f"s3://{base}/tasks", f"s3://{base}/out", "--s3-endpoint", s3.endpoint)
    hold.arm(after_files=1)
    job = JobThread(args).start()
    try:
        hold.wait_until_held(job.alive, JOB_TIMEOUT_S)
        s3.halt()
        hold.release()
        code = job.join(JOB_TIMEOUT_S)
    finally:
        s3.halt()
        s3.launch()
    assert code == EXIT_STORAGE
    line = one_job_line(capfd.readouterr().err, "Could not connect to the endpoint URL")
    assert "storage unreachable" in line and "re-run the same command" in line, line

    hold.reset()
    assert main(args) == 0, capfd.readouterr().err[-3000:]
    assert_complete_and_clean(fs, f"{base}/out", shapes)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs: the deterministic way to fill a disk (needs root, as CI and this machine run tests)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (not root?): {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path) -> Path:
    """Write until the file system is full (ENOSPC): returns the filler file."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC
    return filler


def test_disk_full_mid_run_is_one_line_and_the_rerun_completes(ray_local, hold, shapes, tmp_path, tiny_disk,
                                                               capfd):
    write_shards(shapes, tmp_path / "tasks", IMAGES_PER_FILE)
    out = tiny_disk / "out"
    args = job_args(str(tmp_path / "tasks"), str(out))
    hold.arm(after_files=1)
    job = JobThread(args).start()
    hold.wait_until_held(job.alive, JOB_TIMEOUT_S)
    filler = fill(tiny_disk)
    hold.release()
    assert job.join(JOB_TIMEOUT_S) == EXIT_STORAGE
    one_job_line(capfd.readouterr().err, "no space left on device")

    filler.unlink()
    hold.reset()
    assert main(args) == 0, capfd.readouterr().err[-3000:]
    fs, root = filesystem(str(out))
    assert_complete_and_clean(fs, root, shapes)


def test_second_job_into_the_same_output_is_refused(ray_local, hold, shapes, tmp_path, capfd):
    """While the first job is held, a second one into the same --output exits 2 naming the holder; the
    first then finishes and releases its lease."""
    write_shards(shapes, tmp_path / "tasks", IMAGES_PER_FILE)
    out = tmp_path / "out"
    args = job_args(str(tmp_path / "tasks"), str(out))
    hold.arm(after_files=1)
    first = JobThread(args).start()
    try:
        hold.wait_until_held(first.alive, JOB_TIMEOUT_S)
        capfd.readouterr()
        assert main(args) == 2
        line = one_job_line(capfd.readouterr().err, f"{out} is in use by annotate on host")
        assert "--force" in line, line
    finally:
        hold.release()
    assert first.join(JOB_TIMEOUT_S) == 0
    fs, root = filesystem(str(out))
    assert_complete_and_clean(fs, root, shapes)
