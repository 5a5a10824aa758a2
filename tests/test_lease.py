"""The output lease on local disk and on real S3 (SeaweedFS): exclusive, heartbeating, released, stale
leases taken over, --force only when asked, a taken-over holder never deletes its successor's lease."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

import pytest

from pipeline.lease import LEASE_FILE, Lease, LeaseHeld
from pipeline.storage import StorageOptions, filesystem

#: Wall-clock bound for the heartbeat to show up (it beats every 50 ms here).
BEAT_TIMEOUT_S = 30


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path) -> tuple[str, StorageOptions]:
    if request.param == "local":
        return str(tmp_path / "out"), StorageOptions()
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3.bucket}/lease-{uuid.uuid4().hex[:8]}", s3.options


def read_lease(uri: str, options: StorageOptions) -> dict | None:
    fs, path = filesystem(f"{uri}/{LEASE_FILE}", options)
    fs.invalidate_cache()
    return json.loads(fs.cat(path)) if fs.exists(path) else None


def plant(uri: str, options: StorageOptions, **fields) -> None:
    """A lease file as another job would have left it."""
    now = time.time()
    holder = {"token": "other", "host": "other-host", "pid": 1, "job": "annotate", "started_at": now,
              "heartbeat_at": now, **fields}
    fs, path = filesystem(f"{uri}/{LEASE_FILE}", options)
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe(path, json.dumps(holder).encode())
    if "file" in fs.protocol:  # on local disk the file's mtime is the heartbeat
        os.utime(path, (holder["heartbeat_at"], holder["heartbeat_at"]))


def test_second_holder_is_refused_until_release(folder):
    uri, options = folder
    with Lease(uri, options, job="annotate") as first:
        lease = read_lease(uri, options)
        assert lease["token"] == first.holder.token and lease["host"] == socket.gethostname()
        with pytest.raises(LeaseHeld, match=r"is in use by annotate on host .* pid \d+.*--force"):
            Lease(uri, options, job="annotate").acquire()
    assert read_lease(uri, options) is None
    with Lease(uri, options):  # free again
        pass


def test_heartbeat_moves_forward(folder):
    uri, options = folder
    with Lease(uri, options, heartbeat_s=0.05) as lease:
        first = lease._read()[0].heartbeat_at
        deadline = time.monotonic() + BEAT_TIMEOUT_S
        while lease._read()[0].heartbeat_at == first:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.05)
        assert not lease.lost


def test_live_lease_of_another_host_is_refused_and_force_takes_it(folder):
    uri, options = folder
    plant(uri, options)
    with pytest.raises(LeaseHeld, match="other-host"):
        Lease(uri, options).acquire()
    with Lease(uri, options, force=True) as lease:
        assert read_lease(uri, options)["token"] == lease.holder.token


def test_stale_leases_are_taken_over(folder):
    uri, options = folder
    plant(uri, options, heartbeat_at=time.time() - 3600)  # no heartbeat for an hour
    with Lease(uri, options, stale_after_s=120) as lease:
        assert read_lease(uri, options)["token"] == lease.holder.token
    plant(uri, options, host=socket.gethostname(), pid=2**22 + 12345)  # this host, a pid that does not exist
    with Lease(uri, options) as lease:
        assert read_lease(uri, options)["token"] == lease.holder.token


def test_holder_taken_over_by_force_leaves_the_new_lease_alone(folder):
    uri, options = folder
    old = Lease(uri, options, heartbeat_s=0.05)
    old.acquire()
    new = Lease(uri, options, force=True)
    new.acquire()
    deadline = time.monotonic() + BEAT_TIMEOUT_S
    while not old.lost:  # the old holder's next heartbeat notices
        assert time.monotonic() < deadline, "the old holder never noticed the takeover"
        time.sleep(0.05)
    old.release()
    assert read_lease(uri, options)["token"] == new.holder.token
    new.release()
    assert read_lease(uri, options) is None
