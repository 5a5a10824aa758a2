"""The export job on Ray Data: one task per predictions file, each streaming its rows into its own output file.

    driver   list the predictions files (an annotate output: only its finished ones) and pair each with the
             task shard it came from -> plan
    Ray      from_items(plan) -> map(export_file): coco  -> results/KEY.json (+ images/KEY.json)
                                                  tasks -> KEY.parquet (TASK_SCHEMA, pseudo-labels)
    driver   the (tiny) per-file summaries -> _export.json and the printed summary
Output names are the predictions files' keys, so a rerun overwrites; each file is written under a temporary
name and moved into place. Memory per task is one predictions file at most (coco streams its row groups).
"""

from __future__ import annotations

import json
import posixpath
import resource
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.annotate.layout import OutputLayout, completed, list_inputs
from pipeline.export.coco import image_entry, result_entry, write_json_list
from pipeline.export.config import COCO, ExportConfig
from pipeline.export.pseudo import BELOW_SCORE, ERROR, EXPORTED, pseudo_label
from pipeline.parquet import PARQUET_SUFFIX, list_parquet
from pipeline.schemas import STATUS_OK, TASK_SCHEMA
from pipeline.storage import filesystem, join

SUMMARY_FILE = "_export.json"
STAGING = "_staging"
REJECTED = "rejected"  # coco: a rejected expression has no mask, so no results entry
#: Prediction columns a COCO export reads (masks are the bulk; answer/note/forced_mask are never read).
COCO_COLUMNS = ["expression_id", "image_id", "dataset", "text", "rejected", "mask", "score", "status"]


@dataclass(frozen=True)
class ExportFile:
    """One unit of work: a predictions file, its key (output name) and its task shard (None: unknown)."""

    key: str
    predictions: str
    tasks: str | None


@dataclass
class ExportSummary:
    out: str
    to: str
    files: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # where the prediction rows went
    images: int = 0  # coco: images listed; tasks: task rows written
    missing_tasks: list[str] = field(default_factory=list)  # keys without a known task shard
    peak_task_rss_mb: float = 0.0

    def render(self) -> str:
        total = sum(self.rows.values())
        where = ", ".join(f"{v} {k}" for k, v in sorted(self.rows.items()))
        what = "images listed" if self.to == COCO else "task rows (images) written"
        lines = [f"export: {total} prediction rows from {self.files} file(s) -> {self.out} ({self.to})",
                 f"  rows: {where or 'none'}", f"  {self.images} {what}"]
        if self.missing_tasks:
            lines.append(f"  no task shard known for {len(self.missing_tasks)} file(s), e.g. {self.missing_tasks[0]}"
                         " (pass --tasks)")
        return "\n".join(lines)


def _key(uri: str) -> str:
    return posixpath.basename(uri)[: -len(PARQUET_SUFFIX)]


def plan_files(cfg: ExportConfig) -> list[ExportFile]:
    """Pair every predictions file with its task shard: by key from --tasks, else the annotate run's markers."""
    layout = OutputLayout(cfg.predictions, cfg.storage)
    fs, _ = layout.fs()
    done = completed(layout) if fs.isdir(layout.predictions()) else None
    if done is not None:  # an annotate output: only finished files, each knowing its input shard
        uris = [join(cfg.predictions, "predictions", k + PARQUET_SUFFIX) for k in sorted(done)]
    else:
        uris = list_parquet(cfg.predictions, cfg.storage)
    given = {f.key: f.uri for f in list_inputs(cfg.tasks, cfg.storage)} if cfg.tasks else {}
    recorded = {k: m.get("input") for k, m in (done or {}).items()}
    return [ExportFile(_key(u), u, given.get(_key(u)) if cfg.tasks else recorded.get(_key(u))) for u in uris]


def _write(cfg: ExportConfig, name: str, writer) -> None:
    """Write OUT/name through `writer(file)` under a temporary name, then move it into place."""
    fs, out = filesystem(cfg.out, cfg.storage)
    tmp = posixpath.join(out, STAGING, f"{uuid.uuid4().hex}-{posixpath.basename(name)}")
    target = posixpath.join(out, name)
    fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
    fs.makedirs(posixpath.dirname(target), exist_ok=True)
    with fs.open(tmp, "w" if name.endswith(".json") else "wb") as f:
        writer(f)
    fs.mv(tmp, target)


def _coco_rows(cfg: ExportConfig, pf: pq.ParquetFile, counts: Counter):
    for batch in pf.iter_batches(columns=COCO_COLUMNS):
        for row in batch.to_pylist():
            if row["status"] != STATUS_OK or row["mask"] is None:
                counts[ERROR] += 1
            elif row["rejected"]:
                counts[REJECTED] += 1
            elif row["score"] is None or row["score"] < cfg.min_score:
                counts[BELOW_SCORE] += 1
            else:
                counts[EXPORTED] += 1
                yield result_entry(row)


def export_file(item: dict[str, Any], cfg: ExportConfig) -> dict[str, Any]:
    """Ray map function: one predictions file -> its output file(s) -> one summary row."""
    unit = ExportFile(**item)
    counts: Counter = Counter()
    images = 0
    pred_fs, pred_path = filesystem(unit.predictions, cfg.storage)
    if cfg.to == COCO:
        with pred_fs.open(pred_path, "rb") as f:
            pf = pq.ParquetFile(f)
            _write(cfg, f"results/{unit.key}.json", lambda out: write_json_list(_coco_rows(cfg, pf, counts), out))
        if unit.tasks is not None:
            task_rows = _read_tasks(unit.tasks, cfg, ["image_id", "image_uri", "width", "height", "split", "dataset"])
            images = len(task_rows)
            _write(cfg, f"images/{unit.key}.json", lambda out: write_json_list(map(image_entry, task_rows), out))
    elif unit.tasks is not None:
        with pred_fs.open(pred_path, "rb") as f:
            preds = pq.read_table(f, columns=["expression_id", "image_id", "rejected", "mask", "score", "status"])
        by_image: dict[str, dict[str, dict]] = {}
        for row in preds.to_pylist():
            by_image.setdefault(row["image_id"], {})[row["expression_id"]] = row
        rows = [r for task in _read_tasks(unit.tasks, cfg)
                if (r := pseudo_label(task, by_image.get(task["image_id"], {}), cfg.min_score, counts)) is not None]
        images = len(rows)
        table = pa.Table.from_pylist(rows, schema=TASK_SCHEMA)
        _write(cfg, f"{unit.key}{PARQUET_SUFFIX}", lambda out: pq.write_table(table, out))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    return {"key": unit.key, "counts": json.dumps(counts), "images": images, "peak_rss_mb": peak}


def _read_tasks(uri: str, cfg: ExportConfig, columns: list[str] | None = None) -> list[dict[str, Any]]:
    fs, path = filesystem(uri, cfg.storage)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns).to_pylist()


def run(cfg: ExportConfig) -> ExportSummary:
    """Export every planned file on the connected Ray cluster; the summary is also written to OUT/_export.json."""
    import ray.data

    plan = plan_files(cfg)
    if not plan:
        raise FileNotFoundError(f"no predictions (*.parquet) under --predictions {cfg.predictions}")
    summary = ExportSummary(out=cfg.out, to=cfg.to, files=len(plan),
                            missing_tasks=[p.key for p in plan if p.tasks is None])
    if cfg.to != COCO and summary.missing_tasks:
        raise FileNotFoundError(f"--to tasks needs the task shard of every predictions file; none known for "
                                f"{summary.missing_tasks[:3]} (pass --tasks)")
    rows = ray.data.from_items([asdict(p) for p in plan], override_num_blocks=len(plan)) \
        .map(export_file, fn_kwargs={"cfg": cfg}, num_cpus=cfg.cpus_per_task).take_all()
    totals: Counter = Counter()
    for r in rows:
        totals.update(json.loads(r["counts"]))
        summary.images += r["images"]
        summary.peak_task_rss_mb = max(summary.peak_task_rss_mb, r["peak_rss_mb"])
    summary.rows = dict(totals)
    fs, out = filesystem(cfg.out, cfg.storage)
    if fs.exists(posixpath.join(out, STAGING)):
        fs.rm(posixpath.join(out, STAGING), recursive=True)
    fs.pipe(posixpath.join(out, SUMMARY_FILE), json.dumps(asdict(summary), indent=1).encode("utf-8"))
    return summary
