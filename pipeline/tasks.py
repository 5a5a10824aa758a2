"""Task shards on storage: their file names, reading them as a Ray Dataset, and one row per expression.

Shard files are `{split}-{index:05d}.parquet` in one folder (written by prepare, TASK_SCHEMA); the name is
keyed by split and shard index, so a rerun overwrites instead of adding duplicates. `_prepare.json` beside
them is prepare's completion marker and summary.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.parquet import read_parquet
from pipeline.schemas import TASK_OPTIONAL, TASK_SCHEMA
from pipeline.storage import StorageError, StorageOptions, describe_error, filesystem, join

if TYPE_CHECKING:
    import ray.data

SHARD_SUFFIX = ".parquet"
SUMMARY_FILE = "_prepare.json"
_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_+.-]+)-(?P<index>\d{5})\.parquet$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_+.-]")
#: Image-level columns copied onto every exploded expression row.
IMAGE_FIELDS = ("image_id", "image", "image_uri", "width", "height", "split", "dataset")


def shard_name(split: str, index: int) -> str:
    """`{split}-{index:05d}.parquet`, with characters unsafe in object keys replaced by `_`."""
    return f"{_UNSAFE.sub('_', split) or '_'}-{index:05d}{SHARD_SUFFIX}"


def parse_shard_name(name: str) -> tuple[str, int] | None:
    match = _SHARD_RE.match(posixpath.basename(name))
    return (match["split"], int(match["index"])) if match else None


def list_shards(uri: str, storage: StorageOptions | None = None) -> list[str]:
    """URIs of the shard files directly in folder `uri`, sorted by (split, index); [] when it is absent."""
    fs, path = filesystem(uri, storage)
    fs.invalidate_cache(path)  # s3fs caches listings; shards may have been written by other processes
    try:
        names = [posixpath.basename(p) for p in fs.ls(path, detail=False)] if fs.exists(path) else []
    except Exception as exc:  # re-raised with a clear, credential-free message
        raise StorageError(describe_error(uri, exc)) from exc
    shards = sorted((parsed, n) for n in names if (parsed := parse_shard_name(n)) is not None)
    return [join(uri, n) for _, n in shards]


def read_tasks(uri: str, storage: StorageOptions | None = None, splits: Iterable[str] | None = None,
               columns: list[str] | None = None) -> ray.data.Dataset:
    """The task shards in folder `uri` (local, file:// or s3://) as a lazy Ray Dataset, one row per image.

    `splits` keeps only those splits' shard files (chosen by name, nothing is read); `columns` reads only
    those TASK_SCHEMA columns (e.g. without `image`). One read task per shard file streams its row groups
    (`pipeline.parquet.read_parquet`), cast to TASK_SCHEMA; a file lacking a column (other than the optional
    `error` columns of older shards, read as null) or of a wrong type fails its read task.
    Raises ValueError when nothing matches or a column is unknown.
    """
    unknown = [c for c in columns or [] if c not in TASK_SCHEMA.names]
    if unknown:
        raise ValueError(f"unknown task column(s) {unknown}; task shards have {TASK_SCHEMA.names}")
    wanted = set(splits) if splits is not None else None
    files = [f for f in list_shards(uri, storage)
             if wanted is None or (parse_shard_name(f) or ("", 0))[0] in wanted]
    if not files:
        which = f" of split(s) {sorted(wanted)}" if wanted is not None else ""
        raise ValueError(f"no task shards{which} ({{split}}-NNNNN{SHARD_SUFFIX}) in {uri}: "
                         "run `python -m jobs.prepare` first")
    names = columns or TASK_SCHEMA.names
    return read_parquet(files, storage, columns=names, schema=pa.schema([TASK_SCHEMA.field(n) for n in names]),
                        optional=TASK_OPTIONAL)


def explode_expressions(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One task row -> one dict per expression, each carrying the image-level fields (pure).

    Use with `Dataset.flat_map(explode_expressions)` where a stage works per expression.
    """
    image = {k: row.get(k) for k in IMAGE_FIELDS}
    expressions = row.get("expressions")
    return [{**image, **dict(expr)} for expr in (expressions if expressions is not None else [])]
