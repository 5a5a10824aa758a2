"""Typed, frozen configuration of a training run, validated on the driver before Ray or a model starts.

Defaults are GSVA's official recipe (``gsva-facts.md``): AdamW lr 3e-4, betas (0.9, 0.95), no weight decay,
100 warm-up steps then linear decay to 0, gradient clipping 1.0, bf16 on GPUs, LoRA (r from the preset:
8 for 7B, 64 for 13B) on q/v with lm_head, embed_tokens, SAM's mask decoder and text_hidden_fcs trained.
A run from a random initialisation (the ``tiny`` / ``shapes`` presets) trains every parameter instead.
``stage`` picks what is learned (pipeline.train.stages): GSVA itself, or the SAM / LLaVA bases it starts from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gsva.config import DTYPES, POLICIES
from gsva.losses import LossConfig
from pipeline.storage import StorageOptions

STRATEGIES = ("ddp", "fsdp")
PRECISIONS = ("auto", "bf16", "fp32")
STAGES = ("gsva", "clip", "sam", "llava")
PRETRAINING_STAGES = ("clip", "sam", "llava")
#: Logical CPUs a local Ray cluster keeps free for Ray Data's read/decode tasks beside the workers: on a
#: 2-core machine, workers that take every CPU starve ingestion and the run hangs (ray-facts.md).
INGEST_CPUS = 2
#: Train / validation splits of the task shards (file names `{split}-NNNNN.parquet`).
TRAIN_SPLIT, VAL_SPLIT = "train", "val"


class TrainConfigError(ValueError):
    """A configuration value the run cannot start with; the message names the option."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + warm-up then linear decay to 0 at ``max_steps`` + global-norm clipping."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0

    def validate(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainConfigError(f"--lr must be a positive number, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise TrainConfigError(f"--betas must lie in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip <= 0:
            raise TrainConfigError("--weight-decay and --warmup-steps must be >= 0, --grad-clip > 0")


@dataclass(frozen=True)
class ScalingSpec:
    """How many Ray Train workers, their resources and the data-parallel strategy.

    ``strategy``: "ddp" replicates the model (what fits one GPU: tiny, shapes, 7B with LoRA on 80 GB);
    "fsdp" shards parameters, gradients and optimizer state (torch FSDP2 ``fully_shard`` per transformer
    block; 7B full fine-tuning, 13B). ``threads_per_worker``: torch intra-op threads (default: the CPUs
    reserved per worker, at least 1).
    """

    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    threads_per_worker: int | None = None
    strategy: str = "ddp"
    max_failures: int = 3
    worker_resources: tuple[tuple[str, float], ...] = ()  # custom Ray resources per worker (node placement)

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def torch_threads(self) -> int:
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))

    def validate(self) -> None:
        if self.workers < 1:
            raise TrainConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise TrainConfigError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise TrainConfigError(f"--gpus-per-worker above 1 must be whole, got {self.gpus_per_worker}")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise TrainConfigError("--threads-per-worker must be >= 1")
        if self.strategy not in STRATEGIES:
            raise TrainConfigError(f"--strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.max_failures < 0:
            raise TrainConfigError(f"--max-failures must be >= 0, got {self.max_failures}")


@dataclass(frozen=True)
class InitSpec:
    """Where the weights start: a preset's random init, our checkpoint format, or the official release
    (GSVA ``.bin`` + the LLaVA folder, CLIP and SAM weights, as ``python -m gsva convert`` takes them)."""

    preset: str | None = None
    checkpoint: str | None = None  # our format (folder with config.json) or an official GSVA .bin
    llava: str | None = None
    clip: str | None = None
    sam: str | None = None
    sam_base: str | None = None  # our format: the SAM base (its sam.* weights) ...
    llava_base: str | None = None  # ... combined with the LLaVA base (everything else), gsva.checkpoint
    # gsva.token_init: [SEG]'s / [REJ]'s rows start as the mean of these words' rows (a base that says them)
    seg_words: tuple[str, ...] = ()
    rej_words: tuple[str, ...] = ()

    @property
    def bases(self) -> bool:
        return self.sam_base is not None or self.llava_base is not None

    @property
    def official(self) -> bool:
        return self.checkpoint is not None and self.checkpoint.rstrip("/").endswith((".bin", ".pth", ".pt"))

    def validate(self) -> None:
        from gsva.config import PRESETS

        if self.preset is not None and self.preset not in PRESETS:
            raise TrainConfigError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.bases:
            if self.sam_base is None or self.llava_base is None:
                raise TrainConfigError("--sam-base and --llava-base go together")
            if self.checkpoint is not None or self.preset is not None:
                raise TrainConfigError("--sam-base/--llava-base replace --init and --preset")
            return
        if self.checkpoint is None and self.preset is None:
            raise TrainConfigError("give --preset (random init), --init (a checkpoint to start from) or "
                                   "--sam-base with --llava-base")
        if self.checkpoint is None and PRESETS[self.preset].tokenizer != "builtin-bpe":
            raise TrainConfigError(f"preset {self.preset!r} starts from pretrained weights: pass --init "
                                   "(our checkpoint, or the official GSVA .bin with --llava)")
        if self.official and (self.preset is None or self.llava is None):
            raise TrainConfigError("--init with an official GSVA .bin needs --preset and --llava (and usually "
                                   "--clip/--sam for the frozen encoders)")
        if not self.official and any((self.llava, self.clip, self.sam)):
            raise TrainConfigError("--llava/--clip/--sam only apply to an official GSVA .bin given as --init")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``output`` is the run folder (Ray Train's storage_path/name): checkpoints
    ``step-NNNNNNN/``, the training curve and the metrics history live there."""

    data: str
    output: str
    init: InitSpec
    max_steps: int
    batch_size: int = 8  # samples (conversations) per worker per step
    max_expressions: int | None = None  # K: expressions per sample, at most; None: the model config's
    policy: str | None = None  # None: "all" from a random init, else "lora"
    lora_r: int | None = None  # None: the model config's r (8 for 7B, 64 for 13B)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)  # CE + 2 BCE + 0.5 DICE (official)
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    val_data: str | None = None
    val_every: int | None = None  # None: at every checkpoint
    val_max_images: int | None = 200
    report_every: int = 1
    shuffle_buffer: int = 256  # rows (images) in each worker's local shuffle buffer
    cache_data: bool = False  # decode the splits once into Ray's object store (pipeline.train.data.task_dataset)
    seed: int = 0
    resume: bool = False
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    export: str | None = None  # also write the final model here (our format, LoRA merged)
    export_dtype: str = "float32"
    storage: StorageOptions = field(default_factory=StorageOptions)
    stage: str = "gsva"
    objects: str | None = None  # COCO instances.json: every object of the images (pretraining stages)
    dense_weight: float = 0.0  # sam stage: weight of the embedding cells' class + box loss (gsva.sam_training)
    train_split: str = TRAIN_SPLIT
    val_split: str = VAL_SPLIT

    def validate(self) -> TrainConfig:
        if not self.data or not self.output:
            raise TrainConfigError("--data and --output are required")
        if self.max_steps < 1:
            raise TrainConfigError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1:
            raise TrainConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if (self.init.seg_words or self.init.rej_words) and self.stage != "gsva":
            raise TrainConfigError("--seg-words/--rej-words start GSVA's [SEG]/[REJ] rows: --stage gsva only")
        if self.max_expressions is not None and self.max_expressions < 1:
            raise TrainConfigError(f"--max-expressions must be >= 1, got {self.max_expressions}")
        if self.policy is not None and self.policy not in POLICIES:
            raise TrainConfigError(f"trainable policy must be one of {POLICIES}, got {self.policy!r}")
        if self.lora_r is not None and (self.lora_r < 1 or self.policy not in (None, "lora")):
            raise TrainConfigError("--lora-r must be >= 1 and cannot be combined with --full")
        if self.precision not in PRECISIONS:
            raise TrainConfigError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("checkpoint_every", "keep_checkpoints", "report_every"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.val_every is not None and self.val_every < 1:
            raise TrainConfigError(f"--val-every must be >= 1, got {self.val_every}")
        if self.val_max_images is not None and self.val_max_images < 1:
            raise TrainConfigError(f"--val-max-images must be >= 1, got {self.val_max_images}")
        if self.shuffle_buffer < 0:
            raise TrainConfigError(f"--shuffle-buffer must be >= 0, got {self.shuffle_buffer}")
        if self.export_dtype not in DTYPES:
            raise TrainConfigError(f"--export-dtype must be one of {DTYPES}, got {self.export_dtype!r}")
        if min(self.loss.ce_weight, self.loss.bce_weight, self.loss.dice_weight) < 0:
            raise TrainConfigError("--ce-weight, --bce-weight and --dice-weight must be >= 0")
        if self.stage not in STAGES:
            raise TrainConfigError(f"--stage must be one of {STAGES}, got {self.stage!r}")
        if self.stage in PRETRAINING_STAGES:
            if not self.objects:
                raise TrainConfigError(f"--stage {self.stage} needs --objects (the dataset's COCO instances.json)")
            if self.scaling.strategy != "ddp":
                raise TrainConfigError(f"--stage {self.stage} runs with --strategy ddp only")
            if self.init.bases:
                raise TrainConfigError("--sam-base/--llava-base start the gsva stage, not a pretraining stage")
        elif self.objects:
            raise TrainConfigError("--objects only applies to the pretraining stages (--stage clip|sam|llava)")
        if self.dense_weight < 0 or (self.dense_weight and self.stage != "sam"):
            raise TrainConfigError(f"--dense-weight must be >= 0 and applies to --stage sam only, got "
                                   f"{self.dense_weight} with --stage {self.stage}")
        self.optim.validate()
        self.scaling.validate()
        self.init.validate()
        return self

    def trainable_policy(self) -> str:
        if self.policy is not None:
            return self.policy
        if self.stage in ("clip", "sam"):
            return self.stage
        if self.stage == "llava":
            return "mllm"
        return "lora" if self.lora_r is not None or self.init.checkpoint is not None or self.init.bases else "all"

    @property
    def validation_interval(self) -> int:
        return self.val_every or self.checkpoint_every

    def autocast_dtype(self, on_gpu: bool):
        """The autocast dtype (None: full fp32)."""
        import torch

        if self.precision == "bf16" or (self.precision == "auto" and on_gpu):
            return torch.bfloat16
        return None
