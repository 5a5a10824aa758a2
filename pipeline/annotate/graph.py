"""The annotate pipeline as a lazy Ray Data graph: read task shards -> decode (CPU tasks) -> GSVA (actor pool)
-> write (PredictionSink). Nothing runs until `write_predictions` consumes it, and nothing is materialised
on the driver: rows stream from storage to storage.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pipeline import parquet
from pipeline.annotate.config import Scheduling
from pipeline.annotate.decode import DecodeSpec, DecodeStage
from pipeline.annotate.model import ModelSpec, PredictStage
from pipeline.annotate.sink import PredictionSink
from pipeline.schemas import TASK_OPTIONAL, TASK_SCHEMA
from pipeline.storage import StorageOptions

if TYPE_CHECKING:
    import ray.data


def read_task_files(uris: list[str], storage: StorageOptions) -> ray.data.Dataset:
    """Task shards (one row per image) with a `path` column naming each row's shard (its path within its
    filesystem), cast to TASK_SCHEMA. Input shards and --retry-errors shards (in the output's store) may be on
    different stores: each file is opened through its own URI. The planner has already set aside shards of
    the wrong columns or types (`plan._count_rows`), so a read never fails on them."""
    return parquet.read_parquet(uris, storage, include_paths=True, schema=TASK_SCHEMA, optional=TASK_OPTIONAL)


def annotate(tasks: ray.data.Dataset, decode: DecodeSpec, model: ModelSpec, scheduling: Scheduling,
             predict_cls: type = PredictStage) -> ray.data.Dataset:
    """Task rows -> prediction rows (PART_SCHEMA): the decode stage, then the model replicas.

    `predict_cls` is the model stage class (a subclass in tests injects faults; production uses the default).
    """
    import ray.data

    decoded = tasks.map_batches(
        DecodeStage(decode), batch_format="pyarrow", batch_size=scheduling.decode_batch_size,
        num_cpus=scheduling.decode_task_cpus, compute=ray.data.TaskPoolStrategy(size=scheduling.decode_tasks),
    )
    if scheduling.min_replicas == scheduling.max_replicas:
        pool = ray.data.ActorPoolStrategy(size=scheduling.min_replicas)
    else:
        pool = ray.data.ActorPoolStrategy(min_size=scheduling.min_replicas, max_size=scheduling.max_replicas)
    return decoded.map_batches(
        predict_cls, fn_constructor_args=(model,), compute=pool, batch_format="pyarrow",
        batch_size=scheduling.batch_size, num_cpus=scheduling.cpus_per_replica,
        num_gpus=scheduling.gpus_per_replica or None, resources=dict(scheduling.replica_resources) or None,
    )


def write_predictions(predictions: ray.data.Dataset, sink: PredictionSink) -> None:
    """Run the graph: stream prediction batches into the sink (which finalises each input file)."""
    with _errors_off_console():
        predictions.write_datasink(sink)


@contextmanager
def _errors_off_console() -> Iterator[None]:
    """Keep Ray Data's ERROR records (a failed task's several-hundred-line traceback, once per layer) off the
    console while the graph runs: the failure reaches the caller as an exception, which the job reports in
    one line (or re-raises). Ray Data's log file still gets every record."""
    handlers = [h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console"]
    drop = logging.Filter()
    drop.filter = lambda record: record.levelno < logging.ERROR  # type: ignore[method-assign]
    for handler in handlers:
        handler.addFilter(drop)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(drop)
