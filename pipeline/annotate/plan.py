"""Planning a run on the driver: which input files still need work, and what each must produce.

Resume is "skip completed input files": a file is complete when its predictions file and its marker both
exist. Unfinished files are redone from scratch (their stale parts removed first). With --retry-errors a
completed file whose marker counts errors gets a small retry shard holding only the failed expressions.
"""

from __future__ import annotations

import io
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.annotate.layout import InputFile, OutputLayout, atomic_write, completed, write_json
from pipeline.annotate.sink import Target
from pipeline.parquet import check_schema
from pipeline.schemas import PREDICTION_SCHEMA, STATUS_ERROR, TASK_OPTIONAL, TASK_SCHEMA
from pipeline.storage import StorageOptions, describe_error, filesystem

#: Parallel footer reads: planning thousands of shards on S3 is latency-bound, not CPU-bound.
_PLAN_THREADS = 16


@dataclass
class Plan:
    """read_uris: the shards the graph reads; keys: shard path -> output key; targets: key -> Target."""

    read_uris: list[str] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)
    targets: dict[str, Target] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # keys already complete
    unreadable: dict[str, str] = field(default_factory=dict)  # input uri -> reason

    def add(self, uri: str, path: str, key: str, target: Target) -> None:
        self.read_uris.append(uri)
        self.keys[path] = key
        self.targets[key] = target


def plan_run(inputs: list[InputFile], layout: OutputLayout, storage: StorageOptions, retry_errors: bool) -> Plan:
    plan = Plan()
    done = completed(layout)
    pending = [f for f in inputs if f.key not in done]
    with ThreadPoolExecutor(_PLAN_THREADS) as pool:
        counts = list(pool.map(lambda f: _count_rows(f.uri, storage), pending))
    fs, _ = layout.fs()
    for f, (rows, problem) in zip(pending, counts):
        if problem is not None:
            plan.unreadable[f.uri] = problem
            continue
        _remove(fs, layout.parts(f.key))  # parts of an interrupted earlier run: redone from scratch
        if rows == 0:
            _finish_empty(f, layout)  # nothing to annotate: an empty predictions file, marked done
            continue
        plan.add(f.uri, f.path, f.key, Target(f.uri, rows))
    plan.skipped = [f.key for f in inputs if f.key in done]
    if retry_errors:
        retry = [f for f in inputs if f.key in done and (done[f.key].get("errors") or 0) > 0]
        with ThreadPoolExecutor(_PLAN_THREADS) as pool:
            prepared = list(pool.map(lambda f: _prepare_retry(f, layout, storage), retry))
        for f, images in zip(retry, prepared):
            _remove(fs, layout.parts(f.key))  # parts of an interrupted earlier retry
            if images:
                shard_uri = _uri(layout, layout.retry_input(f.key))
                plan.add(shard_uri, layout.retry_input(f.key), f.key,
                         Target(f.uri, images, base=layout.retry_input(f.key + ".base")))
                plan.skipped.remove(f.key)
    return plan


def _count_rows(uri: str, storage: StorageOptions) -> tuple[int, str | None]:
    """Task rows in a shard from its footer, or why the shard cannot be read (it is then skipped, reported):
    not Parquet, columns missing, or columns of a type that cannot stand for TASK_SCHEMA's (e.g. int64 image_id)."""
    fs, path = filesystem(uri, storage)
    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
    except Exception as exc:  # noqa: BLE001 - reported per file; the other files still run
        return 0, f"not a readable Parquet task shard: {describe_error(uri, exc)}"
    problem = check_schema(uri, schema, TASK_SCHEMA, TASK_OPTIONAL)
    if problem is not None:
        return 0, f"not a task shard: {problem.removeprefix(uri + ' ')} (write shards with jobs.prepare)"
    return meta.num_rows, None


def _finish_empty(f: InputFile, layout: OutputLayout) -> None:
    fs, _ = layout.fs()
    buffer = io.BytesIO()
    pq.write_table(PREDICTION_SCHEMA.empty_table(), buffer)
    atomic_write(fs, layout.predictions(f.key), buffer.getvalue(), layout.staging)
    write_json(fs, layout.marker(f.key), {"input": f.uri, "rows": 0, "errors": 0, "retried": False, "run": None,
                                          "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
               layout.staging)


def _prepare_retry(f: InputFile, layout: OutputLayout, storage: StorageOptions) -> int:
    """Write the retry shard (the task rows of the failed expressions) and a snapshot of the current file.

    Returns the number of task rows in the shard (0: nothing retryable, e.g. errors without expression ids).
    """
    fs, _ = layout.fs()
    with fs.open(layout.predictions(f.key), "rb") as fh:
        current = pq.read_table(fh)
    failed = {(r["image_id"], r["expression_id"]) for r in
              current.select(["image_id", "expression_id", "status"]).to_pylist()
              if r["status"] == STATUS_ERROR and r["expression_id"] is not None}
    if not failed:
        return 0
    in_fs, in_path = filesystem(f.uri, storage)
    with in_fs.open(in_path, "rb") as fh:
        tasks = pq.read_table(fh)
    rows = []
    for row in tasks.to_pylist():
        exprs = [e for e in row["expressions"] or [] if (row["image_id"], e["expression_id"]) in failed]
        if exprs:
            rows.append({**row, "expressions": exprs})
    if not rows:
        return 0
    _write_parquet(fs, layout.retry_input(f.key), pa.Table.from_pylist(rows, schema=tasks.schema))
    _write_parquet(fs, layout.retry_input(f.key + ".base"), current)
    return len(rows)


def _write_parquet(fs, path: str, table: pa.Table) -> None:
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as fh:
        pq.write_table(table, fh)


def _remove(fs, path: str) -> None:
    fs.invalidate_cache(path)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _uri(layout: OutputLayout, path: str) -> str:
    """A filesystem path inside the output back to a URI with the output's scheme."""
    if "://" in layout.uri:
        return f"{layout.uri.split('://', 1)[0]}://{path}"
    return path
