"""Driver side of the train job: Ray, the datasets, Ray Train's TorchTrainer, resume rules and the export.

    read_tasks(train) -> decode  ----\\
                                      TorchTrainer(train_loop_per_worker, N workers: DDP | FSDP2)
    read_tasks(val)[:M] -> decode ---/     RunConfig(name, storage_path [, storage_filesystem for s3://],
                                                     CheckpointConfig(num_to_keep), FailureConfig(max_failures))
    -> result.checkpoint (latest) -> optional export in our format (LoRA merged, any dtype)

``--output`` is the run folder: Ray Train's ``storage_path`` is its parent and ``name`` its last part, so
the checkpoints land in ``OUTPUT/step-NNNNNNN/``. Ray Train resumes any run whose folder already holds
one, so a new run refuses an existing folder unless ``--resume`` is given (and ``--resume`` refuses an
empty one): a typo can neither silently continue an old run nor silently start over.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import time
from dataclasses import dataclass, replace
from typing import Any

from pipeline.storage import StorageOptions, absolute, is_local, join, protocol_of
from pipeline.train.config import INGEST_CPUS, TrainConfig, TrainConfigError

#: Ray Train's checkpoint-manager snapshot in a run folder (ray.train.v2 constants); its presence, or a
#: step-N folder, means the folder holds a run.
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
STEP_PREFIX = "step-"
RUN_FILE = "run.json"  # written beside an export: stage, steps, wall time


@dataclass
class TrainResult:
    checkpoint: str | None  # URI of the latest checkpoint folder (its model/ is our format)
    metrics: dict[str, Any]
    export: str | None


def uncached(uri: str, storage: StorageOptions) -> tuple[Any, str]:
    """(fsspec filesystem, path) like pipeline.storage.filesystem, but a private instance without listing
    caches: the workers write the run folder while the driver reads it (a cached s3fs sees stale listings
    and ETags)."""
    import fsspec

    protocol = protocol_of(uri)
    fs = fsspec.filesystem(protocol, skip_instance_cache=True, use_listings_cache=False,
                           **storage.for_protocol(protocol))
    return fs, fs._strip_protocol(uri)


def run_location(output: str, storage: StorageOptions) -> tuple[str, str, Any]:
    """(storage_path, name, pyarrow filesystem or None) for Ray Train's RunConfig."""
    if is_local(output):
        path = os.path.abspath(output[len("file://"):] if output.startswith("file://") else output)
        return os.path.dirname(path), os.path.basename(path), None
    import pyarrow.fs

    fs, path = uncached(output, storage)
    path = path.rstrip("/")
    parent, name = posixpath.split(path)
    if not parent or not name:
        raise TrainConfigError(f"--output {output} must name a folder inside a bucket, e.g. s3://bucket/runs/x")
    return parent, name, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def holds_run(output: str, storage: StorageOptions) -> bool:
    fs, path = uncached(output, storage)
    if not fs.exists(path):
        return False
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    return RAY_SNAPSHOT_FILE in names or any(n.startswith(STEP_PREFIX) for n in names)


def check_run_folder(cfg: TrainConfig) -> None:
    exists = holds_run(cfg.output, cfg.storage)
    if exists and not cfg.resume:
        raise TrainConfigError(f"{cfg.output} already holds a training run: pass --resume to continue it, or "
                               "choose another --output")
    if cfg.resume and not exists:
        raise TrainConfigError(f"--resume: {cfg.output} holds no training run to continue")


def check_init(cfg: TrainConfig) -> None:
    """Fail on the driver, in seconds, when --init / --preset cannot work (config.json only)."""
    init = cfg.init
    from gsva.config import sam_differences
    from gsva.meta import load_config

    if init.bases:
        sam, llava = load_config(init.sam_base, cfg.storage), load_config(init.llava_base, cfg.storage)
        differ = sam_differences(sam, llava)
        if differ:
            raise TrainConfigError(f"--sam-base {init.sam_base} and --llava-base {init.llava_base} have different "
                                   f"SAM configs ({', '.join(differ)} differ)")
        return
    if init.checkpoint is None or init.official:
        return
    found = load_config(init.checkpoint, cfg.storage)
    if init.preset is not None and found.name != init.preset:
        raise TrainConfigError(f"--preset {init.preset} but --init {init.checkpoint} holds a {found.name!r} model")


def connect_ray(cfg: TrainConfig) -> None:
    """Join RAY_ADDRESS's cluster, else start a local one (loopback) with enough logical CPUs for the workers
    AND Ray Data's ingestion tasks (on a 2-core machine the CPU count is logical, not physical)."""
    from pipeline.ray_runtime import MIN_LOCAL_CPUS, ensure_ray

    needed = math.ceil(cfg.scaling.workers * cfg.scaling.cpus_per_worker) + INGEST_CPUS
    ensure_ray(num_cpus=max(os.cpu_count() or 1, needed, MIN_LOCAL_CPUS))


def datasets(cfg: TrainConfig) -> dict[str, Any]:
    from pipeline.train.data import task_dataset
    from pipeline.train.recipe import TRAIN_DATASET, VAL_DATASET

    out = {TRAIN_DATASET: task_dataset(cfg.data, cfg.train_split, cfg.storage, seed=cfg.seed, cache=cfg.cache_data)}
    if cfg.val_data:
        out[VAL_DATASET] = task_dataset(cfg.val_data, cfg.val_split, cfg.storage, limit=cfg.val_max_images,
                                        shuffle_blocks=False, cache=cfg.cache_data)
    return out


def build_trainer(cfg: TrainConfig, num_workers: int | None = None):
    """The TorchTrainer of a run (``num_workers=0``: Ray Train's in-process local mode, for tests)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.recipe import train_loop_per_worker

    spec = cfg.scaling
    resources = {"CPU": spec.cpus_per_worker, **({"GPU": spec.gpus_per_worker} if spec.use_gpu else {}),
                 **dict(spec.worker_resources)}
    storage_path, name, storage_fs = run_location(cfg.output, cfg.storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg},
        scaling_config=ScalingConfig(num_workers=spec.workers if num_workers is None else num_workers,
                                     use_gpu=spec.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=spec.max_failures)),
        datasets=datasets(cfg),
        dataset_config=DataConfig(execution_options=ordered_ingest()),
    )


def ordered_ingest():
    """Ray Train's ingest options with ``preserve_order``: rows reach a worker in the order the seeded block
    shuffle gives, not in the order parallel decode tasks finish, so that one seed makes one run. A copy of
    the current context's options (what ``DataConfig.default_ingest_options`` carries over, without its
    deprecated ``exclude_resources`` argument)."""
    import copy

    from ray.data import DataContext

    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return options


def checkpoint_uri(cfg: TrainConfig, checkpoint) -> str:
    """The URI (with scheme) of a Ray checkpoint of this run."""
    name = posixpath.basename(checkpoint.path.rstrip("/"))
    return join(cfg.output if not is_local(cfg.output) else os.path.abspath(cfg.output), name)


def export(cfg: TrainConfig, checkpoint_dir: str, started: float | None = None) -> None:
    """Latest checkpoint -> ``--export`` in our format (LoRA merged, ``--export-dtype``), with the
    training curve and history beside the weights, and ``run.json``: stage, steps and the wall time
    from the job's start (``started``, Ray start-up and validations included) to the export."""
    import torch

    from gsva.checkpoint import save_checkpoint
    from pipeline.train import state
    from pipeline.train.recipe import CURVE_FILE, HISTORY_FILE

    model, tokenizer, _ = state.load(checkpoint_dir)
    save_checkpoint(model, tokenizer, cfg.export, cfg.storage, dtype=getattr(torch, cfg.export_dtype), merge=True)
    for name in (CURVE_FILE, HISTORY_FILE):
        src_fs, src = uncached(join(cfg.output, name), cfg.storage)
        if src_fs.exists(src):
            dst_fs, dst = uncached(join(cfg.export, name), cfg.storage)
            with src_fs.open(src, "rb") as f, dst_fs.open(dst, "wb") as g:
                g.write(f.read())
    dst_fs, dst = uncached(join(cfg.export, RUN_FILE), cfg.storage)
    with dst_fs.open(dst, "w") as g:
        json.dump({"stage": cfg.stage, "policy": cfg.trainable_policy(), "max_steps": cfg.max_steps,
                   "batch_size": cfg.batch_size, "workers": cfg.scaling.workers,
                   "wall_seconds": round(time.time() - started, 1) if started is not None else None}, g, indent=2)


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local relative paths made absolute on the driver: Ray Train runs each worker in its own directory, so a
    relative --output would put the training curve (written by the worker) somewhere under Ray's session."""
    def maybe(uri: str | None) -> str | None:
        return absolute(uri) if uri else uri

    init = replace(cfg.init, checkpoint=maybe(cfg.init.checkpoint), llava=maybe(cfg.init.llava),
                   clip=maybe(cfg.init.clip), sam=maybe(cfg.init.sam), sam_base=maybe(cfg.init.sam_base),
                   llava_base=maybe(cfg.init.llava_base))
    return replace(cfg, data=absolute(cfg.data), output=absolute(cfg.output), val_data=maybe(cfg.val_data),
                   export=maybe(cfg.export), init=init, objects=maybe(cfg.objects))


def run(cfg: TrainConfig) -> TrainResult:
    """Validate, start Ray, train, export. Raises TrainConfigError for refusals, Ray's TrainingFailedError
    when the workers fail more often than --max-failures."""
    started = time.time()
    cfg = with_absolute_paths(cfg.validate())
    check_run_folder(cfg)
    check_init(cfg)
    connect_ray(cfg)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    result = build_trainer(cfg).fit()
    uri = checkpoint_uri(cfg, result.checkpoint) if result.checkpoint else None
    if cfg.export and result.checkpoint is not None:
        with result.checkpoint.as_directory() as directory:
            export(cfg, directory, started)
    return TrainResult(checkpoint=uri, metrics=dict(result.metrics or {}), export=cfg.export)
