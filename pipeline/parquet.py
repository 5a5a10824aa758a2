"""Parquet files into Ray Data, one read task per file, streaming its row groups.

Why not `ray.data.read_parquet`: in Ray 2.60 it first runs a ListFiles operator and starts a pool of
footer-reading actors (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS, 32 by default); on a 2-core machine that
took 9.6 s for 8 small files, more than scoring 100,000 expressions. Listing with fsspec on the driver
and reading each file in a plain task costs milliseconds and behaves the same on local files and S3.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from pipeline.schemas import missing_columns, type_problems
from pipeline.storage import StorageError, StorageOptions, describe_error, filesystem

if TYPE_CHECKING:
    import ray.data

PARQUET_SUFFIX = ".parquet"
PATH_COLUMN = "path"  # the file's path within its filesystem, as read_parquet(include_paths=True) names it
READ_TASK_CPUS = 0.25  # I/O-bound: several reads may share a CPU beside the model replicas


def list_parquet(uri: str, storage: StorageOptions | None = None) -> list[str]:
    """URIs of the .parquet files at `uri`: the file itself, or every one under the folder (recursively,
    sorted), leaving out names that start with "_" or "." (staging folders, _SUCCESS, hidden files)."""
    fs, root = filesystem(uri, storage)
    try:
        fs.invalidate_cache(root)
        if fs.isfile(root):
            return [uri]
        if not fs.isdir(root):
            raise FileNotFoundError(f"{uri} does not exist")
        found = sorted(p for p in fs.find(root) if p.endswith(PARQUET_SUFFIX))
    except (FileNotFoundError, StorageError):
        raise
    except Exception as exc:  # re-raised with a clear, credential-free message
        raise StorageError(describe_error(uri, exc)) from exc
    relative = [posixpath.relpath(p, root) for p in found]
    return [uri.rstrip("/") + "/" + rel for rel in relative
            if not any(part.startswith(("_", ".")) for part in rel.split("/"))]


def check_schema(uri: str, schema: pa.Schema, expected: pa.Schema, optional: tuple[str, ...] = ()) -> str | None:
    """Why a file of this Arrow schema cannot be read as `expected` (missing columns, wrong types), or None."""
    missing = missing_columns(schema, expected, optional)
    if missing:
        return f"{uri} lacks the column(s) {missing} of the expected schema"
    wrong = type_problems(schema, expected, optional)
    if wrong:
        return f"{uri} has column(s) of the wrong type: {'; '.join(wrong)}"
    return None


def _with_optional(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with the schema's absent (optional) columns added as nulls, in the schema's order."""
    columns = [table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.table(columns, schema=pa.schema([pa.field(f.name, c.type) for f, c in zip(schema, columns)]))


def _read_files(batch: pa.Table, storage: StorageOptions | None, columns: list[str] | None,
                include_paths: bool, schema: pa.Schema | None, optional: tuple[str, ...]) -> Iterator[pa.Table]:
    """map_batches function: file URIs -> their rows, one row group per output block."""
    import pyarrow.parquet as pq

    for uri in batch.column("uri").to_pylist():
        fs, path = filesystem(uri, storage)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = columns or parquet.schema_arrow.names
            if schema is not None:
                problem = check_schema(uri, parquet.schema_arrow, schema, optional)
                if problem is not None:
                    raise ValueError(problem)
                names = [n for n in names if n in parquet.schema_arrow.names]
            groups = range(parquet.num_row_groups)
            tables = (parquet.read_row_group(g, columns=names) for g in groups) if len(groups) else \
                iter([parquet.schema_arrow.empty_table().select(names)])
            for table in tables:
                if schema is not None:
                    table = _with_optional(table, schema).cast(schema)
                if include_paths:
                    table = table.append_column(PATH_COLUMN, pa.array([path] * table.num_rows, pa.string()))
                yield table


def read_parquet(uris: list[str], storage: StorageOptions | None = None, columns: list[str] | None = None,
                 include_paths: bool = False, schema: pa.Schema | None = None,
                 optional: tuple[str, ...] = ()) -> ray.data.Dataset:
    """The rows of these Parquet files (local, file:// or s3://) as a lazy Dataset; `columns` are read alone,
    `include_paths` adds each row's file path as a `path` column. With `schema` (the read columns' fields),
    a file lacking any of its columns (other than `optional` ones, read as nulls) or holding one of an
    incompatible type (`check_schema`) is an error, and every block is cast to it."""
    import ray.data

    if not uris:
        raise ValueError("no Parquet files to read")
    listing = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=len(uris))
    return listing.map_batches(_read_files, batch_size=1, batch_format="pyarrow", num_cpus=READ_TASK_CPUS,
                               fn_kwargs={"storage": storage, "columns": columns, "include_paths": include_paths,
                                          "schema": schema, "optional": optional})
