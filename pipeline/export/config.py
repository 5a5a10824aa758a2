"""The export job's one validated config: what to read, which format to write, where, and the score cut."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.storage import StorageOptions

COCO, TASKS = "coco", "tasks"
FORMATS = (COCO, TASKS)


class ExportConfigError(ValueError):
    """An option the job cannot run with; the message names it."""


@dataclass(frozen=True)
class ExportConfig:
    """`predictions`: an annotate output folder (with done/ markers) or a folder/file of prediction Parquet.
    `tasks`: the task shards the predictions came from (default: the inputs the annotate run recorded)."""

    predictions: str
    to: str
    out: str
    tasks: str | None = None
    min_score: float = 0.0  # rows whose decision probability is lower are not exported
    storage: StorageOptions = field(default_factory=StorageOptions)
    cpus_per_task: float = 1.0

    def validate(self) -> ExportConfig:
        if self.to not in FORMATS:
            raise ExportConfigError(f"--to must be one of {', '.join(FORMATS)}, got {self.to!r}")
        if not self.predictions or not self.out:
            raise ExportConfigError("--predictions and --out are required")
        if not 0.0 <= self.min_score <= 1.0:
            raise ExportConfigError(f"--min-score is a probability in [0, 1], got {self.min_score}")
        if self.cpus_per_task <= 0:
            raise ExportConfigError(f"cpus_per_task must be > 0, got {self.cpus_per_task}")
        return self
