"""One annotate run from a validated config: check, plan, stream through Ray Data, summarise.

Order matters: everything that can be refused cheaply (bad options, unreachable storage, a missing
checkpoint, a fingerprint mismatch) is refused before Ray Data starts a single replica.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field

from gsva.inputs import reserved_tokens
from pipeline.annotate.config import AnnotateConfig
from pipeline.annotate.decode import DecodeSpec
from pipeline.annotate.fingerprint import check_or_record, checkpoint_identity, fingerprint
from pipeline.annotate.graph import annotate, read_task_files, write_predictions
from pipeline.annotate.layout import OutputLayout, completed, list_inputs
from pipeline.annotate.model import ModelLoadError, ModelSpec, PredictStage
from pipeline.annotate.plan import plan_run
from pipeline.annotate.sink import PredictionSink
from pipeline.lease import Lease
from pipeline.storage import absolute, check_access, files_under, remove_folder


@dataclass
class RunSummary:
    """What a person reads at the end of a run (and what tests assert on)."""

    output: str
    model: str
    mode: str
    replicas: str
    inputs: int = 0
    skipped: int = 0
    processed: int = 0
    rows: int = 0
    errors: int = 0
    total_rows: int = 0
    total_errors: int = 0
    seconds: float = 0.0
    unreadable: dict[str, str] = field(default_factory=dict)
    incomplete: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unreadable and not self.incomplete

    def render(self) -> str:
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"annotate: {'done' if self.ok else 'FINISHED WITH PROBLEMS'} in {self.seconds:.1f} s",
            f"  model {self.model}  mode {self.mode}  replicas {self.replicas}",
            f"  input files: {self.inputs} ({self.skipped} already complete, {self.processed} written this run)",
            f"  this run: {self.rows} expressions, {self.errors} errors, {rate:.1f} expressions/s",
            f"  output total: {self.total_rows} expressions, {self.total_errors} with status=error",
            f"  predictions: {self.output}/predictions/ (one Parquet file per input file)",
        ]
        for uri, reason in list(self.unreadable.items())[:10]:
            lines.append(f"  UNREADABLE INPUT {uri}: {reason}")
        if self.incomplete:
            lines.append(f"  INCOMPLETE: {', '.join(self.incomplete[:10])} (re-run the same command to resume)")
        if self.total_errors:
            lines.append("  error rows: re-run with --retry-errors to retry only them")
        return "\n".join(lines)


def run(config: AnnotateConfig, predict_cls: type = PredictStage) -> RunSummary:
    """Annotate every not-yet-complete input file of `config.input` into `config.output`.

    The output's lease is held from before anything is deleted or written until the summary is known, so a
    second job into the same output is refused (pipeline.lease.LeaseHeld) instead of redoing the work."""
    start = time.perf_counter()
    config = with_absolute_paths(config.validate())
    check_access(config.input, config.storage)
    check_access(config.output, config.storage, write=True)
    try:
        identity = checkpoint_identity(config.checkpoint, config.storage)
    except Exception as exc:  # noqa: BLE001 - the same single message a failing replica would give
        raise ModelLoadError(f"cannot load the model from {config.checkpoint!r}: {exc}") from exc
    with Lease(config.output, config.storage, job="annotate", force=config.force):
        summary = _run_leased(config, identity, predict_cls)
    summary.seconds = time.perf_counter() - start
    return summary


def _run_leased(config: AnnotateConfig, identity: str, predict_cls: type) -> RunSummary:
    run_id = uuid.uuid4().hex
    layout = OutputLayout(config.output, config.storage)
    if config.overwrite:
        fs, _ = layout.fs()
        for folder in layout.owned_folders() + [layout.fingerprint]:
            if fs.exists(folder):
                fs.rm(folder, recursive=True)
    check_or_record(layout, fingerprint(config, identity))

    inputs = list_inputs(config.input, config.storage)
    if not inputs:
        raise FileNotFoundError(f"no task shards (*.parquet) under --input {config.input}; write them with "
                                "`python -m jobs.prepare`")
    plan = plan_run(inputs, layout, config.storage, config.retry_errors)
    sched = config.scheduling
    summary = RunSummary(output=config.output, model=identity, mode=config.mode,
                         replicas=f"{sched.min_replicas}" if sched.min_replicas == sched.max_replicas
                         else f"{sched.min_replicas}..{sched.max_replicas}",
                         inputs=len(inputs), skipped=len(plan.skipped), unreadable=plan.unreadable)
    if plan.targets:
        decode = DecodeSpec(keys=plan.keys, limits=config.limits, storage=config.storage,
                            reserved_tokens=reserved_tokens())
        model = ModelSpec(checkpoint=config.checkpoint, mode=config.mode,
                          max_expressions_per_prompt=config.max_expressions_per_prompt, storage=config.storage,
                          use_gpu=sched.gpus_per_replica > 0, expected_model_id=identity)
        sink = PredictionSink(layout, plan.targets, run_id)
        write_predictions(annotate(read_task_files(plan.read_uris, config.storage), decode, model, sched,
                                   predict_cls), sink)
        summary.rows, summary.errors = sink.summary.get("rows", 0), sink.summary.get("errors", 0)

    done = completed(layout)
    _clean_staging(layout, done)
    finished = {k for k in plan.targets if k in done and done[k].get("run") == run_id}
    summary.processed = len(finished)
    summary.incomplete = sorted(set(plan.targets) - finished)
    summary.total_rows = sum(m.get("rows", 0) for m in done.values())
    summary.total_errors = sum(m.get("errors", 0) for m in done.values())
    return summary


def with_absolute_paths(config: AnnotateConfig) -> AnnotateConfig:
    """Local relative paths made absolute on the driver: Ray workers run in another working directory."""
    checkpoint = config.checkpoint
    if "://" not in checkpoint and (os.path.exists(checkpoint) or os.sep in checkpoint):
        checkpoint = os.path.abspath(checkpoint)  # a preset name stays a name
    return dataclasses.replace(config, input=absolute(config.input), output=absolute(config.output),
                               checkpoint=checkpoint)


def _clean_staging(layout: OutputLayout, done: dict) -> None:
    """Remove leftovers of finished files (a retried write task may re-create a part after the merge), the
    temporary names of atomic writes (left by a write that failed before its move), and staging folders
    left empty: no writer is active any more, and the lease keeps other jobs out."""
    fs, _ = layout.fs()
    retry_folder = posixpath.dirname(layout.retry_input("x"))
    for folder in (layout.parts(), retry_folder):
        fs.invalidate_cache(folder)
        if not fs.exists(folder):
            continue
        for path in fs.ls(folder, detail=False):
            name = posixpath.basename(path.rstrip("/"))
            key = name.removesuffix(".parquet").removesuffix(".base")
            if key in done:
                fs.rm(path, recursive=True)
    for folder in (layout.temporary(), layout.staging):
        fs.invalidate_cache(folder)
        if folder == layout.temporary() or not files_under(fs, folder):
            remove_folder(fs, folder)

