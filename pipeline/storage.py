"""Object storage for the jobs: the model package's fsspec layer (`gsva.storage`) plus job-side checks.

The URI helpers live in `gsva.storage` so that the model package stands alone; the jobs import them from
here with the checks only a job needs (absolute paths for Ray workers, an early access probe).
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

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
