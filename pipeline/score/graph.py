"""The score graph on Ray Data: predictions joined with the task shards' ground truth, scored per block.

    read task shards -> explode expressions ----\\
                                                 union -> groupby(key bucket).map_groups(score_bucket)
    read predictions -> key rows ---------------/          -> partial ScoreStats / CaseBook / InputCounts

Both sides are keyed by (dataset, expression_id) (by expression_id alone for predictions without `dataset`)
and hashed into `partitions` buckets; a bucket holds every
row of its keys, so the join is local to it (a hash-partitioned join that scales with the cluster and needs
no extra package). Each bucket computes per-expression statistics from the RLEs and emits its sums; the
driver only adds those few partial sums (`ScoreStats.__add__`), never a mask.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from pipeline.parquet import READ_TASK_CPUS, check_schema
from pipeline.schemas import PREDICTION_SCHEMA, TASK_OPTIONAL, TASK_SCHEMA
from pipeline.score import metrics
from pipeline.score.blocks import (
    GT_COLUMNS,
    PREDICTION_OPTIONAL,
    PREDICTION_REQUIRED,
    InputCounts,
    explode_ground_truth,
    key_predictions,
    score_bucket,
)
from pipeline.score.cases import CaseBook
from pipeline.storage import StorageError, StorageOptions, describe_error, filesystem

GROUP_COLUMNS = ("split", "dataset")
BUCKET_PARQUET_BYTES = 8 * 2**20  # prediction Parquet per join bucket at most (~75k Shapes-GRES expressions)
MIN_BUCKET_PARQUET_BYTES = 2**20  # ... and at least, unless the whole input is smaller
FOOTER_THREADS = 16  # footers of many prediction files on S3: latency-bound
GT_SCHEMA = pa.schema([TASK_SCHEMA.field(c) for c in GT_COLUMNS])


@dataclass(frozen=True)
class ScoreConfig:
    """What to score and how; validated on construction, before any Ray work."""

    predictions: str
    ground_truth: str
    protocol: str = "rela"
    by: tuple[str, ...] = ("split",)
    partitions: int | None = None  # hash buckets of the join; None: twice the cluster's CPUs
    cases_per_kind: int = 4
    storage: StorageOptions = StorageOptions()

    def __post_init__(self) -> None:
        if self.protocol not in metrics.PROTOCOLS:
            raise ValueError(f"--protocol must be one of {metrics.PROTOCOLS}, got {self.protocol!r}")
        bad = [c for c in self.by if c not in GROUP_COLUMNS]
        if bad or not self.by:
            raise ValueError(f"--by takes a comma list of {GROUP_COLUMNS}, got {','.join(self.by)!r}")
        if self.partitions is not None and self.partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {self.partitions}")


@dataclass
class ScoreResult:
    groups: dict[str, metrics.ScoreStats]
    inputs: InputCounts
    cases: CaseBook

    @property
    def overall(self) -> metrics.ScoreStats:
        total = metrics.ScoreStats()
        for name in sorted(self.groups):
            total = total + self.groups[name]
        return total


@dataclass(frozen=True)
class PredictionColumns:
    """What `check_inputs` found in every predictions file: the columns to read (absent ones read as null)
    and whether the join can use `dataset` (every file has it)."""

    columns: tuple[str, ...]
    by_dataset: bool

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([PREDICTION_SCHEMA.field(c) for c in self.columns])


def read_folder(uri: str, storage: StorageOptions, columns: list[str] | None = None,
                 include_paths: bool = False, schema: pa.Schema | None = None, optional: tuple[str, ...] = ()):
    """Lazy read of a Parquet file or folder (local or s3://), one task per file; `columns` alone are read,
    cast to `schema` (absent `optional` columns read as null)."""
    from pipeline import parquet

    return parquet.read_parquet(parquet.list_parquet(uri, storage), storage, columns, include_paths, schema,
                                optional)


def _schemas(uri: str, storage: StorageOptions) -> list[tuple[str, pa.Schema]]:
    """(file, Arrow schema) of every Parquet file at `uri` (file or folder), footers only, no Ray."""
    import pyarrow.parquet as pq

    from pipeline.parquet import list_parquet

    files = list_parquet(uri, storage)
    if not files:
        raise ValueError(f"{uri} holds no .parquet file")

    def schema(f: str) -> tuple[str, pa.Schema]:
        fs, path = filesystem(f, storage)
        try:
            with fs.open(path, "rb") as fh:
                return f, pq.read_schema(fh)
        except Exception as exc:  # noqa: BLE001 - one line naming the file, whatever pyarrow or fsspec raised
            raise StorageError(f"{f} is not a readable Parquet file: {describe_error(f, exc)}") from exc

    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        return list(pool.map(schema, files))


def check_inputs(cfg: ScoreConfig) -> PredictionColumns:
    """Fail early, naming the file and the columns, when any file of either side lacks what scoring needs or
    holds it with an unusable type (every file is checked, footers only).

    Predictions need expression_id, rejected, mask; `PREDICTION_OPTIONAL` columns are read where present.
    """
    for uri, schema in _schemas(cfg.ground_truth, cfg.storage):
        problem = check_schema(uri, schema, GT_SCHEMA, TASK_OPTIONAL)
        if problem is not None:
            raise ValueError(f"ground truth {problem}")
    present: set[str] = set()
    by_dataset = True
    expected = pa.schema([PREDICTION_SCHEMA.field(c) for c in PREDICTION_REQUIRED + PREDICTION_OPTIONAL])
    for uri, schema in _schemas(cfg.predictions, cfg.storage):
        problem = check_schema(uri, schema, expected, tuple(PREDICTION_OPTIONAL))
        if problem is not None:
            raise ValueError(f"predictions {problem}")
        present |= set(schema.names)
        by_dataset = by_dataset and "dataset" in schema.names
    return PredictionColumns(tuple(c for c in PREDICTION_REQUIRED + PREDICTION_OPTIONAL if c in present), by_dataset)


def build(cfg: ScoreConfig, partitions: int, predictions: PredictionColumns):
    """The lazy graph: Dataset of partial sums (a few rows per bucket)."""
    from ray.data.context import ShuffleStrategy

    keying = {"partitions": partitions, "by_dataset": predictions.by_dataset}
    # Keying runs with the read's CPU share so Ray Data fuses it into the read task (no extra hop).
    gt = read_folder(cfg.ground_truth, cfg.storage, GT_COLUMNS, include_paths=True, schema=GT_SCHEMA,
                      optional=TASK_OPTIONAL).map_batches(
        explode_ground_truth, batch_format="pyarrow", num_cpus=READ_TASK_CPUS, fn_kwargs=keying)
    preds = read_folder(cfg.predictions, cfg.storage, list(predictions.columns), schema=predictions.schema,
                         optional=tuple(PREDICTION_OPTIONAL)).map_batches(
        key_predictions, batch_format="pyarrow", num_cpus=READ_TASK_CPUS, fn_kwargs=keying)
    joined = gt.union(preds)
    # Sort-based grouping: on a small cluster Ray 2.60's default hash shuffle (SHUFFLE_V2) starts its own
    # worker pool and took ~10 s for 200k small rows on 2 cores, the pull-based sort ~0.7 s. Set on this
    # Dataset's own context copy only.
    joined.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return joined.groupby("bucket", num_partitions=partitions).map_groups(
        score_bucket, batch_format="pyarrow",
        fn_kwargs={"protocol": cfg.protocol, "by": tuple(cfg.by), "per_kind": cfg.cases_per_kind,
                   "by_dataset": predictions.by_dataset})


def reduce_partials(rows) -> ScoreResult:
    """Add up the partial rows (dicts with kind, group, payload) of `build`'s Dataset."""
    result = ScoreResult(groups={}, inputs=InputCounts(), cases=CaseBook())
    for row in rows:
        payload = json.loads(row["payload"])
        if row["kind"] == "stats":
            stats = metrics.ScoreStats.from_dict(payload)
            result.groups[row["group"]] = result.groups.get(row["group"], metrics.ScoreStats()) + stats
        elif row["kind"] == "inputs":
            result.inputs = result.inputs + InputCounts.from_dict(payload)
        else:
            result.cases = result.cases + CaseBook.from_dict(payload)
    return result


def default_partitions(cfg: ScoreConfig) -> int:
    """Buckets of the join (and read blocks per side), from the prediction Parquet's size: one bucket (held in
    one task's memory) per BUCKET_PARQUET_BYTES (~75k expressions), spread over up to twice the cluster's
    CPUs while buckets stay above MIN_BUCKET_PARQUET_BYTES (tiny inputs: one bucket, few tasks)."""
    import ray

    fs, path = filesystem(cfg.predictions, cfg.storage)
    size = int(fs.du(path) if fs.isdir(path) else fs.size(path))
    by_cpu = min(2 * int(ray.cluster_resources().get("CPU", 1)), -(-size // MIN_BUCKET_PARQUET_BYTES))
    return max(1, by_cpu, -(-size // BUCKET_PARQUET_BYTES))


def score(cfg: ScoreConfig, predictions: PredictionColumns | None = None) -> ScoreResult:
    """Run the graph on the connected Ray cluster and reduce its partial sums."""
    predictions = predictions or check_inputs(cfg)
    partitions = cfg.partitions or default_partitions(cfg)
    return reduce_partials(build(cfg, partitions, predictions).iter_rows())
