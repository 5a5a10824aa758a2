"""Typed, validated configuration of the annotate job: what to run, how to schedule it, what counts as bad input.

Everything the job does is decided here, before Ray starts or a model loads, so a typo fails in
milliseconds with a message instead of minutes later on a GPU node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gsva.config import MODES
from gsva.inputs import EXPRESSIONS_PER_PROMPT, MAX_EXPRESSION_CHARS
from pipeline.images import ImageLimits
from pipeline.storage import StorageOptions


class ConfigError(ValueError):
    """A configuration value the job cannot run with; the message names the option."""


@dataclass(frozen=True)
class InputLimits:
    """What the CPU stage accepts before the model ever sees an image or an expression.

    Why limits at all: a 40,000 x 40,000 PNG is 4.8 GB of RGB, and a 10,000-character "expression" is a
    prompt no GSVA model was trained on; both become error rows instead of out-of-memory crashes.
    """

    max_expression_chars: int = MAX_EXPRESSION_CHARS  # after Unicode normalisation
    image: ImageLimits = field(default_factory=ImageLimits)  # pixel count (bombs), smallest side, file bytes

    def validate(self) -> None:
        if self.max_expression_chars <= 0:
            raise ConfigError(f"max_expression_chars must be positive, got {self.max_expression_chars}")


@dataclass(frozen=True)
class Scheduling:
    """Ray Data resources of the two stages (decode tasks on CPUs, model replicas in an actor pool).

    The decode stage deliberately asks for a different CPU share than the model replicas: Ray Data fuses
    a task stage into the following actor stage when their resources are equal, and the point of the
    separate stage is that decoding never occupies a model replica.
    """

    min_replicas: int = 1
    max_replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    decode_cpus: float = 0.25  # decoding a PNG/JPEG takes a fraction of a core, mostly waiting on storage
    decode_tasks: int | None = None  # most concurrent decode tasks (None: as many as CPUs allow)
    batch_size: int = 4  # images per model call (each image carries all of its expressions)
    replica_resources: tuple[tuple[str, float], ...] = ()  # custom Ray resources per replica (node placement)
    decode_batch_size: int = 8  # image rows per decode task call

    def validate(self) -> None:
        if self.min_replicas < 1 or self.max_replicas < self.min_replicas:
            raise ConfigError(f"--replicas must be N >= 1 or MIN,MAX with 1 <= MIN <= MAX, "
                              f"got {self.min_replicas},{self.max_replicas}")
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0 or self.decode_cpus <= 0:
            raise ConfigError("resource amounts must be non-negative (decode CPUs positive)")
        if self.gpus_per_replica > 1 and self.gpus_per_replica != int(self.gpus_per_replica):
            raise ConfigError(f"--gpus-per-replica above 1 must be whole, got {self.gpus_per_replica}")
        if self.decode_tasks is not None and self.decode_tasks < 1:
            raise ConfigError(f"decode_tasks must be >= 1, got {self.decode_tasks}")
        if self.batch_size < 1 or self.decode_batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")

    @property
    def decode_task_cpus(self) -> float:
        """The decode stage's CPU share, never equal to a replica's (equal resources would fuse the stages)."""
        return self.decode_cpus / 2 if self.decode_cpus == self.cpus_per_replica else self.decode_cpus


@dataclass(frozen=True)
class AnnotateConfig:
    """One annotate run. `fingerprint_fields` lists what must match to resume into an existing output."""

    input: str
    output: str
    checkpoint: str = "tiny"
    mode: str = "generate"
    max_expressions_per_prompt: int | None = EXPRESSIONS_PER_PROMPT
    limits: InputLimits = field(default_factory=InputLimits)
    scheduling: Scheduling = field(default_factory=Scheduling)
    storage: StorageOptions = field(default_factory=StorageOptions)
    overwrite: bool = False
    retry_errors: bool = False
    force: bool = False  # take over the output's lease from a job believed gone (pipeline.lease)

    def validate(self) -> AnnotateConfig:
        if not self.input:
            raise ConfigError("--input is required")
        if not self.output:
            raise ConfigError("--output is required")
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.max_expressions_per_prompt is not None and self.max_expressions_per_prompt < 1:
            raise ConfigError(f"--max-expressions-per-prompt must be >= 1, got {self.max_expressions_per_prompt}")
        if self.overwrite and self.retry_errors:
            raise ConfigError("--overwrite starts afresh, --retry-errors re-runs errors of an existing output: "
                              "choose one")
        self.limits.validate()
        self.scheduling.validate()
        return self


def parse_replicas(text: str) -> tuple[int, int]:
    """'N' -> (N, N) (a fixed pool: GPU pools scale up slowly); 'MIN,MAX' -> an autoscaling pool."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--replicas must be N or MIN,MAX (integers), got {text!r}") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ConfigError(f"--replicas must be N or MIN,MAX, got {text!r}")
