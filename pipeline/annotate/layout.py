"""Where the annotate job puts things, and the two file operations that make its output trustworthy.

Output folder layout (any fsspec URI: local path, file://, s3://)::

    OUTPUT/fingerprint.json              what made these predictions (checked before resuming)
    OUTPUT/predictions/KEY.parquet       one file per input file, PREDICTION_SCHEMA, written atomically
    OUTPUT/done/KEY.json                 completion marker, written after its predictions file
    OUTPUT/_staging/parts/KEY/*.parquet  batches of an unfinished input file (content-keyed names)
    OUTPUT/_staging/retry/KEY.parquet    the task rows re-run by --retry-errors
    OUTPUT/_staging/tmp/*                temporary names of atomic writes (only while a write is under way)
    OUTPUT/_lease.json                   the running job's lease (pipeline.lease): one job per output

KEY is the input file's path relative to the input root, without ".parquet", "/" -> "__": the same input
always maps to the same names, so a re-run overwrites instead of adding a second copy.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline.parquet import PARQUET_SUFFIX, list_parquet
from pipeline.storage import StorageOptions, filesystem

TMP_FOLDER = "tmp"


@dataclass(frozen=True)
class InputFile:
    """One task shard: its URI as given (scheme kept), its path inside the filesystem, and its key."""

    uri: str
    path: str
    key: str


def list_inputs(input_uri: str, options: StorageOptions) -> list[InputFile]:
    """Task shards under `input_uri` (a folder, searched recursively, or one .parquet file), sorted.

    Names starting with "_" or "." (staging folders, _SUCCESS files) are not inputs.
    """
    fs, root = filesystem(input_uri, options)
    if fs.isfile(root):
        name = posixpath.basename(root)
        return [InputFile(input_uri, root, _key(name))]
    try:
        uris = list_parquet(input_uri, options)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--input {exc}") from None
    prefix = input_uri.rstrip("/") + "/"
    files = []
    for uri in uris:
        rel = uri[len(prefix):]
        files.append(InputFile(uri, posixpath.join(root, rel), _key(rel)))
    keys = [f.key for f in files]
    if len(set(keys)) != len(keys):  # only possible with names that already contain "__"
        raise ValueError(f"input files under {input_uri} map to clashing output names; rename them")
    return files


def _key(relative_path: str) -> str:
    stem = relative_path[: -len(PARQUET_SUFFIX)] if relative_path.endswith(PARQUET_SUFFIX) else relative_path
    return stem.replace("/", "__")


@dataclass(frozen=True)
class OutputLayout:
    """Paths inside one output folder; picklable, so write tasks on any node get the same layout."""

    uri: str
    options: StorageOptions

    def fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return filesystem(self.uri, self.options)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.fs()[1], *parts)

    @property
    def fingerprint(self) -> str:
        return self._path("fingerprint.json")

    def predictions(self, key: str = "") -> str:
        return self._path("predictions", key + PARQUET_SUFFIX) if key else self._path("predictions")

    def marker(self, key: str = "") -> str:
        return self._path("done", key + ".json") if key else self._path("done")

    def parts(self, key: str = "") -> str:
        return self._path("_staging", "parts", key) if key else self._path("_staging", "parts")

    def retry_input(self, key: str) -> str:
        return self._path("_staging", "retry", key + PARQUET_SUFFIX)

    @property
    def staging(self) -> str:
        return self._path("_staging")

    def temporary(self) -> str:
        return self._path("_staging", TMP_FOLDER)

    def owned_folders(self) -> list[str]:
        """What --overwrite deletes: only the job's own names, never other files a user keeps there."""
        return [self.predictions(), self.marker(), self.staging]


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes, staging: str) -> None:
    """Write `data` to a unique temporary name under `staging`, then move it to `path`.

    A reader sees the old file, or the whole new one, never a prefix: a local rename is atomic, and an
    S3 object appears only when its upload completes (the move is a server-side copy).
    """
    tmp = posixpath.join(staging, TMP_FOLDER, f"{uuid.uuid4().hex}-{posixpath.basename(path)}")
    fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def write_json(fs: fsspec.AbstractFileSystem, path: str, value: dict[str, Any], staging: str) -> None:
    atomic_write(fs, path, json.dumps(value, indent=2, sort_keys=True).encode("utf-8"), staging)


def read_optional_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """The parsed JSON file at `path` of `fs`, or None when it does not exist (markers, the fingerprint)."""
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def completed(layout: OutputLayout) -> dict[str, dict[str, Any]]:
    """key -> marker of every input file whose predictions file and marker both exist."""
    fs, _ = layout.fs()
    markers = {posixpath.basename(p)[: -len(".json")]: p for p in _ls(fs, layout.marker()) if p.endswith(".json")}
    finals = {posixpath.basename(p)[: -len(PARQUET_SUFFIX)] for p in _ls(fs, layout.predictions())
              if p.endswith(PARQUET_SUFFIX)}
    done = {}
    for key, path in markers.items():
        if key in finals:
            marker = read_optional_json(fs, path)
            if marker is not None:
                done[key] = marker
    return done


def _ls(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """A fresh listing: s3fs caches listings per filesystem instance (and fsspec shares instances in a
    process), so without the invalidation a driver would not see the files its Ray workers wrote since."""
    fs.invalidate_cache(path)
    try:
        return [p if isinstance(p, str) else p["name"] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
