"""Prepare: any source format -> task shards (TASK_SCHEMA Parquet), as a Ray Data job.

The graph, read top to bottom:
    driver   source files -> ImageItems (index refs/annotations; cheap)  -> shard plan (split, index, items)
    Ray      from_items(plan) -> map(convert_shard): per image, check/read the image, rasterise the
             union masks, optionally embed the bytes; write `{split}-{index:05d}.parquet` -> summary row
    driver   take the (tiny) summary rows, delete stale shards of a previous run, write `_prepare.json`
A shard is the unit of parallelism and of output, so file names are deterministic, `--rows-per-file` is
exact (minus skipped images) and a rerun overwrites. Only summaries ever come back to the driver.
An image that cannot be used (missing, not a regular file, too large, not an image...) is not dropped: its
row is written without bytes and with the reason in `error` (flagged), so every expression reaches annotate.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.images import ImageError, ImageLimits, check_image_file, decode_image, read_image_bytes
from pipeline.prepare.formats.items import ImageItem, SkipReport, flag, flagged_report, to_task_row
from pipeline.prepare.formats.sources import SourceConfig, load_items
from pipeline.schemas import TASK_SCHEMA
from pipeline.storage import StorageOptions, check_access, filesystem, is_local, join
from pipeline.tasks import SUMMARY_FILE, list_shards, parse_shard_name, shard_name

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

DEFAULT_ROWS_PER_FILE = 500
#: Rows per Parquet row group: a reader streams a shard a row group at a time (~10 MB of COCO images).
ROW_GROUP_ROWS = 64


@dataclass(frozen=True)
class PrepareConfig:
    """Where and how task shards are written (the source is given separately, as ImageItems)."""

    out: str
    rows_per_file: int = DEFAULT_ROWS_PER_FILE
    embed_images: bool = False
    storage: StorageOptions = field(default_factory=StorageOptions)
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    cpus_per_task: float = 1.0
    #: splits this run is responsible for (None: all): stale shards are deleted only within them.
    splits: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("an output URI (--out) is required")
        if self.rows_per_file < 1:
            raise ValueError(f"--rows-per-file must be >= 1, got {self.rows_per_file}")
        if self.cpus_per_task <= 0:
            raise ValueError(f"cpus_per_task must be > 0, got {self.cpus_per_task}")


@dataclass
class PrepareResult:
    """What prepare wrote: per-split rows and expressions, the files, what was skipped and why, and what was
    flagged (written with its reason in `error`, for annotate to turn into error rows)."""

    out: str
    files: list[str]
    per_split: dict[str, dict[str, int]]
    skips: SkipReport
    flagged: SkipReport = field(default_factory=lambda: SkipReport(action="flagged"))

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.per_split.values())

    @property
    def expressions(self) -> int:
        return sum(s["expressions"] for s in self.per_split.values())

    @property
    def usable_rows(self) -> int:
        """Rows whose image can be used (not flagged)."""
        return self.rows - sum(s["flagged_rows"] for s in self.per_split.values())

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "rows": self.rows, "expressions": self.expressions,
                "per_split": self.per_split, "files": self.files, "skipped": self.skips.to_dict(),
                "flagged": self.flagged.to_dict()}

    def summary_text(self, dataset: str) -> str:
        """The human summary the job prints: totals, per split, and each skip reason with an example."""
        lines = [(f"prepared {dataset} -> {self.out}: {self.rows} images, {self.expressions} expressions "
                  f"in {len(self.files)} file(s)")]
        for split, s in sorted(self.per_split.items()):
            lines.append(f"  {split:>8}: {s['rows']} images, {s['expressions']} expressions "
                         f"({s['no_target']} no-target), {s['flagged_rows']} flagged image(s), {s['files']} file(s)")
        for report, title in ((self.flagged, "flagged {} item(s), kept as error rows for annotate:"),
                              (self.skips, "skipped {} item(s):")):
            if report.total():
                lines.append(title.format(report.total()))
                for reason, entry in report.to_dict().items():
                    example = entry["examples"][0] if entry["examples"] else "-"
                    lines.append(f"  {reason}: {entry['items']} item(s), {entry['expressions']} expression(s); "
                                 f"e.g. {example}")
        return "\n".join(lines)


def plan_shards(items: list[ImageItem], config: PrepareConfig) -> list[dict[str, Any]]:
    """Group items by split (in order) and cut them into shards of at most `rows_per_file` images."""
    by_split: dict[str, list[ImageItem]] = {}
    for item in items:
        by_split.setdefault(item["split"], []).append(item)
    plan = []
    for split in sorted(by_split):
        chunk = by_split[split]
        for index, start in enumerate(range(0, len(chunk), config.rows_per_file)):
            plan.append({"split": split, "index": index, "uri": join(config.out, shard_name(split, index)),
                         "items": json.dumps(chunk[start:start + config.rows_per_file])})
    return plan


def _checked_image(item: ImageItem, config: PrepareConfig) -> tuple[ImageItem, bytes | None]:
    """Check the image (referenced: a regular file within the byte cap; embedded: read and decoded too).

    An image that fails is returned flagged (`items.flag`) without bytes, never dropped; so is an item
    flagged before (e.g. its path leaves the root), which is not touched at all.
    """
    if item.get("error"):
        return item, None
    uri = item["image_uri"]
    try:
        if not config.embed_images:
            check_image_file(uri, config.storage, config.image_limits.max_bytes)
            return item, None
        data = read_image_bytes(uri, config.storage, config.image_limits.max_bytes)
        height, width = decode_image(data, uri, config.image_limits).shape[:2]
    except ImageError as exc:
        return flag(dict(item), exc.reason, str(exc)), None
    if item["width"] is not None and (item["width"], item["height"]) != (width, height):
        return flag(dict(item), "image size mismatch", f"{uri}: file is {width}x{height}, annotations say "
                    f"{item['width']}x{item['height']}"), None
    return {**item, "width": int(width), "height": int(height)}, data


def write_shard(rows: list[dict[str, Any]], uri: str, storage: StorageOptions) -> None:
    """Write rows as one TASK_SCHEMA Parquet file; locally via a temporary name + rename (atomic)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=TASK_SCHEMA)
    fs, path = filesystem(uri, storage)
    fs.makedirs(os.path.dirname(path) if is_local(uri) else path.rsplit("/", 1)[0], exist_ok=True)
    target = f"{path}.tmp" if is_local(uri) else path
    with fs.open(target, "wb") as f:
        pq.write_table(table, f, row_group_size=ROW_GROUP_ROWS)
    if target != path:
        fs.mv(target, path)


def convert_shard(task: dict[str, Any], config: PrepareConfig) -> dict[str, Any]:
    """Ray map function: one planned shard -> its Parquet file -> one summary row."""
    skips, flagged = SkipReport(), SkipReport(action="flagged")
    rows = []
    for item in json.loads(task["items"]):
        checked, image = _checked_image(item, config)
        row = to_task_row(checked, image, skips)
        flagged_report(checked, row, flagged)
        if row is not None:
            rows.append(row)
    write_shard(rows, task["uri"], config.storage)
    exprs = [e for r in rows for e in r["expressions"]]
    return {"split": task["split"], "index": task["index"], "uri": task["uri"], "rows": len(rows),
            "expressions": len(exprs), "no_target": sum(1 for e in exprs if e["no_target"]),
            "flagged_rows": sum(1 for r in rows if r["error"]),
            "skips": json.dumps(skips.to_dict()), "flagged": json.dumps(flagged.to_dict())}


def build_graph(plan: ray.data.Dataset, config: PrepareConfig) -> ray.data.Dataset:
    """Lazy: planned shards -> summaries of the written shards."""
    return plan.map(convert_shard, fn_kwargs={"config": config}, num_cpus=config.cpus_per_task)


def _remove_stale(config: PrepareConfig, written: set[str]) -> list[str]:
    """Delete shard files of a previous run (in this run's splits) that this run did not rewrite."""
    stale = []
    for uri in list_shards(config.out, config.storage):
        split, _ = parse_shard_name(uri) or ("", 0)
        if uri not in written and (config.splits is None or split in config.splits):
            fs, path = filesystem(uri, config.storage)
            fs.rm(path)
            stale.append(uri)
    return stale


#: Where Shapes-GRES's raw gRefCOCO-format files go when no root is given: beside the shards.
SHAPES_RAW_DIR = "raw"


def load_source(source: SourceConfig, config: PrepareConfig) -> tuple[list[ImageItem], SkipReport]:
    """Check storage access, then index the source on the driver (cheap; no Ray needed yet), so a wrong path
    or key fails before any cluster work. Raises StorageError / ValueError / FileNotFoundError."""
    check_access(config.out, config.storage, write=True)
    if source.format != "shapes":
        check_access(source.root, config.storage)
    skips = SkipReport()
    return load_items(source, config.storage, skips), skips


def run(items: list[ImageItem], config: PrepareConfig, skips: SkipReport | None = None) -> PrepareResult:
    """Convert ImageItems into task shards at `config.out` on the connected Ray cluster."""
    import ray.data

    skips = skips if skips is not None else SkipReport()
    flagged = SkipReport(action="flagged")
    plan = plan_shards(items, config)
    summaries = []
    if plan:
        graph = build_graph(ray.data.from_items(plan, override_num_blocks=len(plan)), config)
        summaries = sorted(graph.take_all(), key=lambda s: (s["split"], s["index"]))
    per_split: dict[str, dict[str, int]] = {}
    for s in summaries:
        entry = per_split.setdefault(s["split"], {"rows": 0, "expressions": 0, "no_target": 0, "flagged_rows": 0,
                                                  "files": 0})
        for key in ("rows", "expressions", "no_target", "flagged_rows"):
            entry[key] += s[key]
        entry["files"] += 1
        skips = skips + SkipReport.from_dict(json.loads(s["skips"]))
        flagged = flagged + SkipReport.from_dict(json.loads(s["flagged"]), action="flagged")
    files = [s["uri"] for s in summaries]
    stale = _remove_stale(config, set(files))
    if stale:
        log.info("removed %d stale shard(s) of a previous run: %s", len(stale), stale)
    result = PrepareResult(config.out, files, per_split, skips, flagged)
    fs, path = filesystem(join(config.out, SUMMARY_FILE), config.storage)
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe(path, json.dumps(result.to_dict(), indent=1).encode("utf-8"))
    return result
