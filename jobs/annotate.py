"""`python -m jobs.annotate`: GSVA predictions for every expression of a task-shard dataset, on Ray Data.

With no arguments it runs the embedded default: local Ray, Shapes-GRES task shards generated into
./data/shapes-gres/tasks if absent, the checkpoint checkpoints/shapes-gres/ if it exists (else the tiny preset),
predictions into ./outputs/annotate, a one-screen summary, and outputs/annotate/gallery.png (a few images with
their masks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gsva.config import MODES
from pipeline.annotate.config import AnnotateConfig, ConfigError, InputLimits, Scheduling, parse_replicas
from pipeline.images import DEFAULT_MAX_BYTES, ImageLimits
from pipeline.storage import StorageOptions, join

DEFAULT_TASKS = Path("data/shapes-gres/tasks")
DEFAULT_OUTPUT = Path("outputs/annotate")
#: The shipped Shapes-GRES model, found next to the code (also in a `ray job submit --working-dir` upload).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-gres"
FALLBACK_PRESET = "tiny"
#: Embedded default dataset: small enough for a laptop CPU in a minute, all three splits.
DEFAULT_IMAGES = 200
DEFAULT_SEED = 0
DEFAULT_ROWS_PER_FILE = 25  # several input files: resume and progress work per file
#: Exit statuses: 0 every input file complete; 1 finished with problems (unreadable inputs, incomplete files);
#: 2 refused before starting (bad option, unreachable input, missing model, fingerprint mismatch, the output
#: in use by another job); 3 storage failed during the run (unreachable, full, read-only): finished files are
#: kept, re-run the same command once storage is back to resume.
EXIT_PROBLEMS, EXIT_REFUSED, EXIT_STORAGE = 1, 2, 3


EXIT_HELP = """exit status:
  0  every input file is complete
  1  finished with problems (unreadable input files, incomplete files): see the summary
  2  refused before starting: a bad option, unreachable input, missing model, fingerprint mismatch, or the
     output in use by another job (its lease; --force takes it over)
  3  storage failed during the run (unreachable, full or read-only): finished files are kept; re-run the
     same command when storage is back to resume"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.annotate", description=__doc__, epilog=EXIT_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="task shards: a folder or .parquet file (local, file://, s3://); "
                                   f"default: Shapes-GRES generated into {DEFAULT_TASKS}")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT), help="output folder (default: %(default)s)")
    p.add_argument("--checkpoint", help=f"checkpoint URI or preset name (default: {DEFAULT_CHECKPOINT}/ if it "
                                        f"exists, else the {FALLBACK_PRESET!r} preset)")
    p.add_argument("--mode", default="generate", choices=MODES,
                   help="generate: no ground truth needed; teacher-forced: the official benchmark protocol")
    p.add_argument("--replicas", default="1", help="model replicas: N (fixed pool) or MIN,MAX (autoscaling)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per replica; 0 runs on CPU")
    p.add_argument("--cpus-per-replica", type=float, default=Scheduling.cpus_per_replica,
                   help="CPUs reserved per replica (default: %(default)s)")
    p.add_argument("--replica-resources", help='custom Ray resources per replica, JSON, e.g. \'{"gpu_node": 1}\': '
                                               "replicas run only on nodes that offer them")
    p.add_argument("--decode-tasks", type=int, help="most concurrent image-decoding tasks (default: as many as "
                                                     "free CPUs allow)")
    p.add_argument("--batch-size", type=int, default=Scheduling.batch_size,
                   help="images per model call, each with all its expressions (default: %(default)s)")
    p.add_argument("--max-expressions-per-prompt", type=int, default=AnnotateConfig.max_expressions_per_prompt,
                   help="at most N expressions of one image per conversation (default: all of them in one, "
                        "the GSVA protocol; a cap only for images whose list would overflow the context)")
    p.add_argument("--max-expression-chars", type=int, default=InputLimits.max_expression_chars,
                   help="longer expressions become error rows (default: %(default)s)")
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help="larger referenced image files become error rows, checked before reading "
                        "(default: %(default)s = 64 MiB)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL / AWS default)")
    p.add_argument("--overwrite", action="store_true", help="discard the output's earlier predictions first")
    p.add_argument("--retry-errors", action="store_true", help="re-run only the rows that ended in error")
    p.add_argument("--force", action="store_true",
                   help="take over the output's lease from another job (only if that job is known to be gone)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> AnnotateConfig:
    from pipeline.ray_runtime import parse_resources

    lo, hi = parse_replicas(args.replicas)
    try:
        resources = parse_resources(args.replica_resources, "--replica-resources")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    checkpoint = args.checkpoint or (str(DEFAULT_CHECKPOINT) if DEFAULT_CHECKPOINT.is_dir() else FALLBACK_PRESET)
    return AnnotateConfig(
        input=args.input or str(DEFAULT_TASKS), output=args.output, checkpoint=checkpoint,
        mode=args.mode, max_expressions_per_prompt=args.max_expressions_per_prompt,
        limits=InputLimits(max_expression_chars=args.max_expression_chars,
                           image=ImageLimits(max_bytes=args.max_image_bytes)),
        scheduling=Scheduling(min_replicas=lo, max_replicas=hi, gpus_per_replica=args.gpus_per_replica,
                              cpus_per_replica=args.cpus_per_replica, decode_tasks=args.decode_tasks,
                              batch_size=args.batch_size, replica_resources=resources),
        storage=StorageOptions(s3_endpoint=args.s3_endpoint),
        overwrite=args.overwrite, retry_errors=args.retry_errors, force=args.force,
    ).validate()


def ensure_default_data(tasks: Path) -> None:
    """Generate the embedded Shapes-GRES task shards (raw files in tasks/raw) unless prepare finished before."""
    from pipeline.tasks import SUMMARY_FILE

    if (tasks / SUMMARY_FILE).exists():
        return
    from pipeline.prepare import graph as prepare
    from pipeline.prepare.formats.sources import SourceConfig

    print(f"generating Shapes-GRES ({DEFAULT_IMAGES} images) into {tasks} ...", flush=True)
    out = str(tasks.resolve())
    source = SourceConfig(format="shapes", root=join(out, prepare.SHAPES_RAW_DIR), num_images=DEFAULT_IMAGES,
                          seed=DEFAULT_SEED)
    config = prepare.PrepareConfig(out=out, rows_per_file=DEFAULT_ROWS_PER_FILE)
    items, skips = prepare.load_source(source, config)
    result = prepare.run(items, config, skips)
    print(result.summary_text(source.dataset), flush=True)
    if result.rows == 0:
        raise SystemExit("annotate: generating the default dataset wrote no image")


def main(argv: list[str] | None = None) -> int:
    from pipeline.annotate.fingerprint import FingerprintMismatch
    from pipeline.annotate.model import ModelLoadError
    from pipeline.annotate.run import run
    from pipeline.lease import LeaseHeld
    from pipeline.ray_runtime import ensure_ray
    from pipeline.storage import StorageError, storage_failure

    args = parse_args(argv)
    try:
        config = build_config(args)
    except ValueError as exc:  # ConfigError, or a limit refused by its own config class
        print(f"annotate: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    ensure_ray()  # before prepare, so the default dataset's generation joins the same (4+ CPU) cluster
    if args.input is None:
        ensure_default_data(DEFAULT_TASKS)
    try:
        summary = run(config)
    except (ConfigError, FingerprintMismatch, StorageError, ModelLoadError, FileNotFoundError, LeaseHeld) as exc:
        print(f"annotate: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as exc:  # noqa: BLE001 - failures inside Ray: a replica's model load, storage
        message = model_load_message(exc)
        if message is not None:
            print(f"annotate: {message}", file=sys.stderr)
            return EXIT_REFUSED
        failure = storage_failure(exc)
        if failure is None:
            raise
        print(f"annotate: storage failed during the run: {failure}; files already finished are kept, re-run "
              "the same command to resume once storage is back", file=sys.stderr)
        return EXIT_STORAGE
    print(summary.render(), flush=True)
    if args.input is None:
        show_gallery(config)
    return 0 if summary.ok else EXIT_PROBLEMS


def show_gallery(config: AnnotateConfig) -> None:
    """The embedded default (make demo) ends with a picture of a few annotated images."""
    from pipeline.annotate.gallery import write_gallery
    from pipeline.annotate.layout import OutputLayout
    from pipeline.storage import absolute

    uri = write_gallery(OutputLayout(absolute(config.output), config.storage))
    if uri is not None:
        print(f"  gallery: {uri} (a few images, every expression's mask in its own colour)", flush=True)


def model_load_message(exc: BaseException) -> str | None:
    """The one ModelLoadError line inside whatever Ray wrapped it in, or None if it is something else."""
    from pipeline.annotate.model import ModelLoadError
    from pipeline.errors import causes

    for e in causes(exc):
        if isinstance(e, ModelLoadError):
            return str(e)
    # A replica that fails in __init__ reaches the driver as ActorDiedError, which keeps only the text of the
    # RayTaskError inside it (Ray 2.60 stores no cause object): the error's own line is read from that text.
    for line in str(exc).splitlines():
        if "ModelLoadError: " in line:
            return line.split("ModelLoadError: ", 1)[1].strip()
    return None


if __name__ == "__main__":
    sys.exit(main())
