"""`python -m jobs.export`: annotate predictions -> COCO results or pseudo-label task shards, on Ray Data.

    python -m jobs.export --predictions outputs/annotate --to coco --out outputs/export/coco
    python -m jobs.export --predictions outputs/annotate --to tasks --min-score 0.9 --out data/pseudo/tasks

coco:  OUT/results/KEY.json (one COCO results file per predictions file: image_id, segmentation RLE, score,
       expression_id, text; for pycocotools' COCO.loadRes against the source's instances.json) and
       OUT/images/KEY.json (the task shard's images).
tasks: OUT/KEY.parquet task shards whose gt_mask / no_target are the predictions (jobs.train, jobs.score).
Error rows are never exported; OUT/_export.json and the printed summary say how many rows went where.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.export.config import FORMATS, ExportConfig, ExportConfigError
from pipeline.storage import StorageError, StorageOptions

EXIT_REFUSED = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", required=True, help="an annotate output folder (its finished files), or a "
                                                        "folder / file of prediction Parquet")
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output folder (local, file://, s3://)")
    p.add_argument("--tasks", help="the task shards the predictions came from (default: the inputs the annotate "
                                   "run recorded); coco: the images list, tasks: the rows to relabel")
    p.add_argument("--min-score", type=float, default=ExportConfig.min_score,
                   help="leave out rows whose decision probability is lower (default: %(default)s)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL / AWS default)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.export.graph import run
    from pipeline.ray_runtime import ensure_ray
    from pipeline.storage import absolute, check_access

    try:
        cfg = ExportConfig(predictions=absolute(args.predictions), to=args.to, out=absolute(args.out),
                           tasks=absolute(args.tasks) if args.tasks else None, min_score=args.min_score,
                           storage=StorageOptions(s3_endpoint=args.s3_endpoint)).validate()
        for uri in (cfg.predictions, *([cfg.tasks] if cfg.tasks else [])):
            check_access(uri, cfg.storage)
        check_access(cfg.out, cfg.storage, write=True)
        ensure_ray()
        summary = run(cfg)
    except (ExportConfigError, StorageError, FileNotFoundError, ValueError) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    print(summary.render(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
