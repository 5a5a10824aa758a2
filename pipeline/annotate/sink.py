"""The writer: a Ray Data Datasink that turns a stream of prediction batches into one atomic file per input.

Why not `write_parquet`: it names files by write task with a random id and mixes rows of many inputs in
one file, so a re-run duplicates rows and no input file is ever "done". Here every write task writes its
rows as parts named by their content (a retried batch overwrites its own part), and the task whose part
completes an input file (the parts' image counts add up to the file's row count) merges the parts into
predictions/KEY.parquet (atomic move) and then writes the done/KEY.json marker. Two tasks that both see
the file complete write identical bytes; a linearizable store (local disk, S3) guarantees at least one does.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult

from pipeline.annotate.hold import maybe_hold
from pipeline.annotate.layout import OutputLayout, atomic_write, completed, write_json
from pipeline.annotate.rows import PART_SCHEMA, POS, SOURCE, UNIT, final_table
from pipeline.schemas import STATUS_ERROR


@dataclass(frozen=True)
class Target:
    """What one input file must produce: rows for `images` task rows; on --retry-errors, the new rows replace
    the error rows of `base` (a snapshot of the earlier predictions file, so finalising twice is harmless)."""

    input_uri: str
    images: int
    base: str | None = None


class PredictionSink(Datasink[dict]):
    """Writes parts, finalises complete input files; `summary` holds the merged stats after the write."""

    def __init__(self, layout: OutputLayout, targets: dict[str, Target], run_id: str):
        self.layout = layout
        self.targets = targets
        self.run_id = run_id
        self.summary: dict[str, Any] = {}

    @property
    def supports_distributed_writes(self) -> bool:
        return True

    def get_name(self) -> str:
        return "WritePredictions"

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t.cast(PART_SCHEMA) for t in tables if t.num_rows]
        stats = {"rows": 0, "errors": 0, "finalized": []}
        if not tables:
            return stats
        table = pa.concat_tables(tables)
        fs, _ = self.layout.fs()
        maybe_hold(self._completed_files)
        for key in pc.unique(table[SOURCE]).to_pylist():
            part = table.filter(pc.equal(table[SOURCE], key))
            real = part.filter(pc.greater_equal(part[POS], 0))
            stats["rows"] += real.num_rows
            stats["errors"] += pc.sum(pc.equal(real["status"], STATUS_ERROR)).as_py() or 0
            units = pc.sum(part[UNIT]).as_py() or 0
            folder = self.layout.parts(key)
            fs.makedirs(folder, exist_ok=True)
            with fs.open(posixpath.join(folder, f"{units:08d}-{_digest(part)}.parquet"), "wb") as f:
                pq.write_table(part, f)
            if self._complete(fs, key) and self._finalize(fs, key):
                stats["finalized"].append(key)
                maybe_hold(self._completed_files)
        return stats

    def _completed_files(self) -> int:
        return len(completed(self.layout))

    def on_write_complete(self, write_result: WriteResult[dict]) -> None:
        returns = [r for r in write_result.write_returns if r]
        self.summary = {
            "rows": sum(r["rows"] for r in returns),
            "errors": sum(r["errors"] for r in returns),
            "finalized": sorted(k for r in returns for k in r["finalized"]),
        }

    def _complete(self, fs, key: str) -> bool:
        folder = self.layout.parts(key)
        fs.invalidate_cache(folder)
        names = [posixpath.basename(p) for p in fs.ls(folder, detail=False)]
        # Equality, not >=: more units than rows would mean duplicated work, which must never be written.
        return sum(int(n.split("-", 1)[0]) for n in names if n.endswith(".parquet")) == self.targets[key].images

    def _finalize(self, fs, key: str) -> bool:
        """Merge the parts of `key` into its predictions file, then mark it done. False if another task did."""
        folder = self.layout.parts(key)
        try:
            parts = [pq.read_table(fs.open(p, "rb")) for p in sorted(fs.ls(folder, detail=False))
                     if p.endswith(".parquet")]
        except FileNotFoundError:  # a concurrent finaliser already merged and removed the parts
            return False
        merged = pa.concat_tables(parts)
        order = pc.sort_indices(merged, sort_keys=[("image_id", "ascending"), (POS, "ascending")])
        new = final_table(merged.take(order))
        target = self.targets[key]
        if target.base is not None:
            new = _replace_rows(pq.read_table(fs.open(target.base, "rb")), new)
        buffer = io.BytesIO()
        pq.write_table(new, buffer)
        atomic_write(fs, self.layout.predictions(key), buffer.getvalue(), self.layout.staging)
        errors = pc.sum(pc.equal(new["status"], STATUS_ERROR)).as_py() or 0
        write_json(fs, self.layout.marker(key), {
            "input": target.input_uri, "rows": new.num_rows, "errors": errors, "retried": target.base is not None,
            "run": self.run_id,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, self.layout.staging)
        try:
            fs.rm(folder, recursive=True)
        except FileNotFoundError:  # removed by a concurrent finaliser of the same, identical content
            pass
        return True


def _digest(part: pa.Table) -> str:
    """Content identity of a part: the same rows always give the same part name."""
    ids = sorted(zip(part["image_id"].to_pylist(), part["expression_id"].to_pylist(), part[POS].to_pylist()),
                 key=lambda t: tuple("" if v is None else str(v) for v in t))
    return hashlib.sha1(repr(ids).encode("utf-8")).hexdigest()[:20]


def _replace_rows(old: pa.Table, new: pa.Table) -> pa.Table:
    """Old rows in their order, each (image_id, expression_id) re-run replaced by its new row."""
    fresh: dict[tuple, list[dict]] = {}
    for row in new.to_pylist():
        fresh.setdefault((row["image_id"], row["expression_id"]), []).append(row)
    rows = []
    for row in old.to_pylist():
        queue = fresh.get((row["image_id"], row["expression_id"]))
        rows.append(queue.pop(0) if queue and row["status"] == STATUS_ERROR else row)
    rows.extend(r for queue in fresh.values() for r in queue)  # none expected; never drop a computed row
    return pa.Table.from_pylist(rows, schema=new.schema)
