"""The score graph on Ray Data: predictions joined with the task shards' ground truth, scored per block.

    read task shards -> explode expressions ----\\
                                                 union -> groupby(key bucket).map_groups(score_bucket)
    read predictions -> key rows ---------------/          -> partial ScoreStats / CaseBook / InputCounts

Both sides are keyed by (dataset, expression_id) and hashed into `partitions` buckets; a bucket holds every
row of its keys, so the join is local to it (a hash-partitioned join that scales with the cluster and needs
no extra package). Each bucket computes per-expression statistics from the RLEs and emits its sums; the
driver only adds those few partial sums (`ScoreStats.__add__`), never a mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline.parquet import READ_TASK_CPUS
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
from pipeline.storage import StorageOptions, filesystem

GROUP_COLUMNS = ("split", "dataset")
BUCKET_PARQUET_BYTES = 16 * 2**20  # prediction Parquet per join bucket at most (~100k expressions)
MIN_BUCKET_PARQUET_BYTES = 2**20  # ... and at least, unless the whole input is smaller


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


def read_parquet(uri: str, storage: StorageOptions, columns: list[str] | None = None,
                 include_paths: bool = False):
    """Lazy read of a Parquet file or folder (local or s3://), one task per file; `columns` alone are read."""
    from pipeline import parquet

    return parquet.read_parquet(parquet.list_parquet(uri, storage), storage, columns, include_paths)


def parquet_columns(uri: str, storage: StorageOptions) -> list[str]:
    """Column names of a Parquet file, or of the first Parquet file under a folder (footer only, no Ray)."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri, storage)
    if fs.isdir(path):
        files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
        if not files:
            raise ValueError(f"{uri} holds no .parquet file")
        path = files[0]
    with fs.open(path, "rb") as f:
        return pq.read_schema(f).names


def check_inputs(cfg: ScoreConfig) -> list[str]:
    """Fail early, naming the input and the columns, when either side lacks what scoring needs.

    Returns the prediction columns to read (required plus whichever optional ones exist).
    """
    missing = [c for c in GT_COLUMNS if c not in parquet_columns(cfg.ground_truth, cfg.storage)]
    if missing:
        raise ValueError(f"ground truth {cfg.ground_truth} lacks column(s) {missing}")
    pred_names = parquet_columns(cfg.predictions, cfg.storage)
    missing = [c for c in PREDICTION_REQUIRED if c not in pred_names]
    if missing:
        raise ValueError(f"predictions {cfg.predictions} lack column(s) {missing}")
    return [c for c in PREDICTION_REQUIRED + PREDICTION_OPTIONAL if c in pred_names]


def build(cfg: ScoreConfig, partitions: int, prediction_columns: list[str]):
    """The lazy graph: Dataset of partial sums (a few rows per bucket)."""
    from ray.data.context import ShuffleStrategy

    # Keying runs with the read's CPU share so Ray Data fuses it into the read task (no extra hop).
    gt = read_parquet(cfg.ground_truth, cfg.storage, GT_COLUMNS, include_paths=True).map_batches(
        explode_ground_truth, batch_format="pyarrow", num_cpus=READ_TASK_CPUS, fn_kwargs={"partitions": partitions})
    preds = read_parquet(cfg.predictions, cfg.storage, prediction_columns).map_batches(
        key_predictions, batch_format="pyarrow", num_cpus=READ_TASK_CPUS, fn_kwargs={"partitions": partitions})
    joined = gt.union(preds)
    # Sort-based grouping: on a small cluster Ray 2.60's default hash shuffle (SHUFFLE_V2) starts its own
    # worker pool and took ~10 s for 200k small rows on 2 cores, the pull-based sort ~0.7 s. Set on this
    # Dataset's own context copy only.
    joined.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return joined.groupby("bucket", num_partitions=partitions).map_groups(
        score_bucket, batch_format="pyarrow",
        fn_kwargs={"protocol": cfg.protocol, "by": tuple(cfg.by), "per_kind": cfg.cases_per_kind})


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
    one task's memory) per BUCKET_PARQUET_BYTES (~100k expressions), spread over up to twice the cluster's
    CPUs while buckets stay above MIN_BUCKET_PARQUET_BYTES (tiny inputs: one bucket, few tasks)."""
    import ray

    fs, path = filesystem(cfg.predictions, cfg.storage)
    size = int(fs.du(path) if fs.isdir(path) else fs.size(path))
    by_cpu = min(2 * int(ray.cluster_resources().get("CPU", 1)), -(-size // MIN_BUCKET_PARQUET_BYTES))
    return max(1, by_cpu, -(-size // BUCKET_PARQUET_BYTES))


def score(cfg: ScoreConfig, prediction_columns: list[str] | None = None) -> ScoreResult:
    """Run the graph on the connected Ray cluster and reduce its partial sums."""
    columns = prediction_columns or check_inputs(cfg)
    partitions = cfg.partitions or default_partitions(cfg)
    return reduce_partials(build(cfg, partitions, columns).iter_rows())
