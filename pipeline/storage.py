"""Object storage for the jobs: the model package's fsspec layer (`gsva.storage`) plus job-side checks.

The URI helpers live in `gsva.storage` so that the model package stands alone; the jobs import them from
here with the checks only a job needs (absolute paths for Ray workers, an early access probe).
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
from typing import Any

import fsspec

from gsva.storage import (  # noqa: F401 - the jobs' storage API, one implementation
    StorageError,
    StorageOptions,
    describe_error,
    filesystem,
    is_local,
    join,
    protocol_of,
)


def absolute(uri: str) -> str:
    """A local relative path made absolute (Ray workers run in other working directories); URIs unchanged."""
    return os.path.abspath(uri) if "://" not in uri else uri


def remove_folder(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete `path` and every object below it; no error if it is absent. (An S3 store with real folders,
    as SeaweedFS, may go on listing an emptied folder as a prefix for a while: it holds no object.)"""
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(path)


def files_under(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """The files (objects) below `folder`; S3 stores with real folders (SeaweedFS) also list folders, as
    0-byte entries, which are left out."""
    fs.invalidate_cache(folder)
    return [p for p, info in fs.find(folder, detail=True).items() if info.get("type") != "directory"]


#: errno values that mean "the storage cannot take more writes", not "this one file is bad".
_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
         errno.EROFS: "read-only file system"}
#: What an unreachable S3 endpoint looks like once Ray has turned the exception into text.
_UNREACHABLE_TEXT = ("Could not connect to the endpoint URL", "Cannot connect to host", "Connection refused")


def storage_failure(exc: BaseException) -> str | None:
    """One credential-free line if `exc` (or anything it wraps) is storage being full, read-only or
    unreachable, else None. Exit status and advice are the job's; this only recognises the cause."""
    from pipeline.errors import causes, first_line

    for e in causes(exc):
        if isinstance(e, OSError) and e.errno in _FULL:
            where = f" ({e.filename})" if e.filename else ""
            return f"{_FULL[e.errno]}{where}"
        if isinstance(e, ConnectionError) or type(e).__name__ in ("EndpointConnectionError",
                                                                  "ClientConnectorError", "ConnectTimeoutError"):
            return f"storage unreachable: {first_line(str(e))}"
    text = str(exc)
    for reason in _FULL.values():
        if reason in text.lower():
            return reason
    for marker in _UNREACHABLE_TEXT:
        for line in text.splitlines():
            if marker in line:
                return f"storage unreachable: {line.strip()}"
    return None


def check_access(uri: str, options: StorageOptions | None = None, write: bool = False) -> None:
    """Fail early with a clear message when `uri` cannot be read (or written: its bucket/parent)."""
    fs, path = filesystem(uri, options)
    try:
        if write:
            fs.makedirs(path, exist_ok=True)
            join_path = os.path.join if is_local(uri) else posixpath.join
            probe = join_path(path, ".gsva-write-probe")
            with fs.open(probe, "wb") as f:
                f.write(b"ok")
            fs.rm(probe)
        elif not fs.exists(path):
            raise FileNotFoundError(path)
    except Exception as exc:  # noqa: BLE001 - re-raised with a clear message
        raise StorageError(describe_error(uri, exc)) from exc


def read_json(uri: str, options: StorageOptions | None = None) -> Any:
    """The parsed JSON file at `uri` (local, file:// or s3://); ValueError naming it when it is not JSON."""
    fs, path = filesystem(uri, options)
    with fs.open(path, "rb") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{uri} is not valid JSON: {exc}") from exc
