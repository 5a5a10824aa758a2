"""`python -m jobs.prepare`: convert a dataset into task shards (see README, "Task shards").

Examples:
  python -m jobs.prepare --format shapes --num-images 400 --seed 0 --out data/shapes-gres/tasks
  python -m jobs.prepare --format grefcoco --root data/grefcoco --images data/coco/train2014 \\
      --splits val,testA,testB --out s3://bucket/grefcoco/tasks --s3-endpoint http://127.0.0.1:8333
  python -m jobs.prepare --format manifest --root s3://bucket/my/manifest.jsonl --out s3://bucket/my/tasks
"""

from __future__ import annotations

import argparse
import sys

from pipeline.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageLimits
from pipeline.prepare.formats.sources import FORMATS, SourceConfig
from pipeline.prepare.graph import DEFAULT_ROWS_PER_FILE, SHAPES_RAW_DIR, PrepareConfig
from pipeline.storage import StorageError, StorageOptions, join


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--root", help="dataset folder (grefcoco/refcoco*: the refs file + instances.json), "
                   "manifest file (manifest), or where shapes writes its raw files (default OUT/raw)")
    p.add_argument("--images", help="image folder for grefcoco/refcoco* (default ROOT/images)")
    p.add_argument("--splits", help="comma-separated splits to convert, e.g. val,testA (default: all)")
    p.add_argument("--split-by", help="refcoco: unc|google, refcoco+: unc, refcocog: umd|google")
    p.add_argument("--num-images", type=int, help="shapes: how many images to generate")
    p.add_argument("--seed", type=int, help="shapes: random seed (default 0)")
    p.add_argument("--out", required=True, help="output folder: local path, file:// or s3:// URI")
    p.add_argument("--rows-per-file", type=int, default=DEFAULT_ROWS_PER_FILE,
                   help=f"images per shard file (default {DEFAULT_ROWS_PER_FILE})")
    p.add_argument("--embed-images", action=argparse.BooleanOptionalAction, default=False,
                   help="store image bytes in the shards (opened and validated) instead of only image_uri")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="with --embed-images: larger images are refused as decompression bombs")
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help="larger image files are flagged (checked before reading; default %(default)s = 64 MiB)")
    p.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store (else AWS_ENDPOINT_URL / AWS)")
    p.add_argument("--num-cpus", type=int,
                   help="logical CPUs of the local Ray cluster (default: max(4, cores); ignored with RAY_ADDRESS)")
    return p


def build_configs(args: argparse.Namespace) -> tuple[SourceConfig, PrepareConfig]:
    """Validated configs from parsed arguments (ValueError names the offending flag)."""
    splits = frozenset(s.strip() for s in args.splits.split(",") if s.strip()) if args.splits else None
    root = args.root
    if args.format == "shapes" and not root:
        root = join(args.out, SHAPES_RAW_DIR)
    source = SourceConfig(format=args.format, root=root, images=args.images, splits=splits,
                          split_by=args.split_by, num_images=args.num_images, seed=args.seed)
    config = PrepareConfig(out=args.out, rows_per_file=args.rows_per_file, embed_images=args.embed_images,
                           storage=StorageOptions(s3_endpoint=args.s3_endpoint),
                           image_limits=ImageLimits(max_pixels=args.max_image_pixels,
                                                    max_bytes=args.max_image_bytes), splits=splits)
    return source, config


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        source, config = build_configs(args)
    except ValueError as exc:
        parser.error(str(exc))

    from pipeline.prepare import graph as prepare
    from pipeline.ray_runtime import ensure_ray

    try:
        items, skips = prepare.load_source(source, config)
        ensure_ray(args.num_cpus)
        result = prepare.run(items, config, skips)
    except (StorageError, ValueError, FileNotFoundError) as exc:
        print(f"prepare failed: {exc}", file=sys.stderr)
        return 2
    print(result.summary_text(source.dataset))
    if result.usable_rows == 0:
        print("prepare failed: no image could be converted (see the flagged and skipped items above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
