"""An exclusive lease on an output folder, kept on the same storage as the output (local disk or S3).

Why: two jobs writing one output folder would both redo every file, and their staging areas would mix.
The first job creates FOLDER/_lease.json (owner token, host, pid, start and heartbeat times) and
refreshes the heartbeat every HEARTBEAT_S (on S3 a conditional rewrite, on local disk the file's mtime);
a second job finds it and is refused with who holds it.
The lease is released (deleted) when the job ends, however it ends short of a kill.

A lease is stale, and is taken over without asking, when its heartbeat is older than STALE_AFTER_S, or when
its owner ran on this host and that process no longer exists or no longer runs it (a killed job resumed
on the same machine need not wait). `force=True` takes over a live lease: only for a holder known to be gone.

Atomicity of "create if absent": local disk uses O_CREAT|O_EXCL (and an atomic rename to retire a stale
lease); S3 uses a conditional PUT (`If-None-Match: *` to create, `If-Match: <ETag>` to take over or to
heartbeat), which AWS S3 and SeaweedFS both honour. On a store that ignores those headers the lease is read
back after writing and the owner token compared: two jobs starting within one round trip of each other could
then both win. Heartbeat times are the writers' clocks: hosts must agree within STALE_AFTER_S (NTP).
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.storage import StorageOptions, filesystem, is_local

LEASE_FILE = "_lease.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0
TAKEOVER_ATTEMPTS = 5
#: Tokens of the leases this process holds now: a lease left by an earlier, ended run of this same process
#: (its release failed because storage was down) is stale, one held by a running job here is not.
_HELD_HERE: set[str] = set()


class LeaseHeld(RuntimeError):
    """Another live job holds the lease; the message says who and what to do."""


@dataclass(frozen=True)
class Holder:
    token: str
    host: str
    pid: int
    job: str
    started_at: float
    heartbeat_at: float

    def age_s(self, now: float) -> float:
        return now - self.heartbeat_at

    def stale(self, now: float, stale_after_s: float) -> bool:
        if self.age_s(now) > stale_after_s:
            return True
        if self.host != socket.gethostname():
            return False
        return not _pid_alive(self.pid) or (self.pid == os.getpid() and self.token not in _HELD_HERE)

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(self.started_at))
        return (f"{self.job} on host {self.host}, pid {self.pid}, started {started}, last heartbeat "
                f"{self.age_s(now):.0f} s ago")


class Lease:
    """`with Lease(uri, options, job="annotate"):` holds FOLDER/_lease.json for the duration of the block."""

    def __init__(self, folder_uri: str, options: StorageOptions | None = None, job: str = "job",
                 force: bool = False, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.uri = folder_uri
        self.fs, folder = filesystem(folder_uri, options)
        self.local = is_local(folder_uri)
        self.path = (os.path.join if self.local else posixpath.join)(folder, LEASE_FILE)
        self.job, self.force = job, force
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.holder: Holder | None = None
        self.lost = False  # set when another job took the lease over (or removed it) while we held it
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ lifecycle
    def acquire(self) -> None:
        now = time.time()
        mine = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), self.job, now, now)
        judged: str | None = None  # the token of the holder we decided to take over
        for _ in range(TAKEOVER_ATTEMPTS):
            if self._create(mine):
                break
            current, etag = self._read()
            if current is None:
                continue  # released between our two looks
            if judged not in (None, current.token):
                raise LeaseHeld(f"{self.uri}: another job took the lease at the same moment; try again")
            if not (self.force or current.stale(time.time(), self.stale_after_s)):
                raise LeaseHeld(f"{self.uri} is in use by {current.describe(time.time())}; wait for it to "
                                f"finish, or pass --force if that job is gone (a lease is stale after "
                                f"{self.stale_after_s:.0f} s without a heartbeat)")
            judged = current.token
            if self._replace(mine, etag):  # fails if the holder's heartbeat rewrote it meanwhile: look again
                break
        else:
            raise LeaseHeld(f"{self.uri}: the lease kept changing while we took it over; try again")
        self.holder = mine
        _HELD_HERE.add(mine.token)
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (never another job's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.holder is None:
            return
        _HELD_HERE.discard(self.holder.token)
        current, _ = self._read()
        if current is not None and current.token == self.holder.token:
            self.fs.rm(self.path)
        self.holder = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - storage gone (the error being raised says so); the lease goes stale
            if exc[0] is None:
                raise

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            assert self.holder is not None
            try:
                current, etag = self._read()
                if current is None or current.token != self.holder.token:
                    self.lost = True
                    return
                if self.local:  # the file's mtime is the heartbeat: touching a successor's file is harmless
                    os.utime(self.path)
                    continue
                fresh = Holder(**{**asdict(self.holder), "heartbeat_at": time.time()})
                if self._put(fresh, json.dumps(asdict(fresh)).encode("utf-8"), IfMatch=etag):
                    self.holder = fresh
            except Exception:  # noqa: BLE001 - a storage hiccup: the next beat tries again
                continue

    # ------------------------------------------------------------------------------------ storage details
    def _read(self) -> tuple[Holder | None, str | None]:
        """(holder, S3 ETag or None) of the current lease, (None, None) when there is none."""
        self.fs.invalidate_cache(self.path)
        try:
            if self.local:
                with open(self.path, "rb") as f:
                    data = f.read()
                    beat = os.fstat(f.fileno()).st_mtime
                etag = None
            else:
                bucket, key, _ = self.fs.split_path(self.path)
                response = self.fs.call_s3("get_object", Bucket=bucket, Key=key)
                etag = response["ETag"]
                data = _read_body(self.fs, response)
        except FileNotFoundError:
            return None, None
        try:
            holder = Holder(**json.loads(data.decode("utf-8")))
            if self.local:
                holder = Holder(**{**asdict(holder), "heartbeat_at": max(holder.heartbeat_at, beat)})
            return holder, etag
        except (ValueError, TypeError):  # a torn or foreign file: treat as stale so it can be replaced
            return Holder("?", "?", -1, "an unreadable lease", 0.0, 0.0), etag

    def _create(self, holder: Holder) -> bool:
        """Create the lease if absent; False if one exists."""
        body = json.dumps(asdict(holder)).encode("utf-8")
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            return True
        return self._put(holder, body, IfNoneMatch="*")

    def _replace(self, holder: Holder, etag: str | None) -> bool:
        """Replace the lease we just read (ETag `etag` on S3) with `holder`; False if it changed meanwhile."""
        body = json.dumps(asdict(holder)).encode("utf-8")
        if self.local:
            retired = f"{self.path}.{holder.token}"
            try:
                os.rename(self.path, retired)  # atomic: of two jobs taking over, one rename wins
            except FileNotFoundError:
                pass
            else:
                os.remove(retired)
            return self._create(holder)
        return self._put(holder, body, **({"IfMatch": etag} if etag else {"IfNoneMatch": "*"}))

    def _put(self, holder: Holder, body: bytes, **condition: str) -> bool:
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **condition)
        except OSError as exc:  # s3fs maps 412 Precondition Failed to EINVAL with the server's text
            if "pre-condition" in str(exc).lower() or "precondition" in str(exc).lower():
                return False
            raise
        current, _ = self._read()  # stores that ignore conditional headers: the last writer wins; check
        return current is not None and current.token == holder.token


def _read_body(fs: Any, response: dict) -> bytes:
    """The body of an s3fs `get_object` response (an aiobotocore stream, read on s3fs's event loop)."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with response["Body"] as stream:
            return await stream.read()

    return sync(fs.loop, read)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
