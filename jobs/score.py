"""Score predictions against the task shards' ground truth on Ray Data and write the report.

    python -m jobs.score --predictions URI --ground-truth URI --out URI [--protocol rela|gsva]
                         [--by split,dataset] [--baseline URI/metrics.json] [--s3-endpoint URL]

Writes OUT/metrics.json, OUT/metrics.md and OUT/*.png; with --baseline prints the differences.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.score.metrics import PROTOCOLS
from pipeline.storage import StorageError, StorageOptions, check_access


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__.split("\n\n")[0])
    p.add_argument("--predictions", required=True, help="Parquet predictions (file or folder, local or s3://)")
    p.add_argument("--ground-truth", required=True, help="task shards with the ground truth (Parquet)")
    p.add_argument("--out", required=True, help="folder for metrics.json, metrics.md and the PNGs")
    p.add_argument("--protocol", choices=PROTOCOLS, default="rela",
                   help="rela: the gRefCOCO authors' evaluator; gsva: GSVA's eval_gres (reads forced_mask)")
    p.add_argument("--by", default="split", help="comma list of split,dataset to group by (default: split)")
    p.add_argument("--baseline", help="an earlier metrics.json to compare with")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--partitions", type=int, help="hash buckets of the join (default: 2 x cluster CPUs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.score.graph import ScoreConfig, check_inputs, score
    from pipeline.score.report import percent, write_report

    try:
        cfg = ScoreConfig(predictions=args.predictions, ground_truth=args.ground_truth, protocol=args.protocol,
                          by=tuple(c.strip() for c in args.by.split(",") if c.strip()),
                          partitions=args.partitions, storage=StorageOptions(s3_endpoint=args.s3_endpoint))
        for uri in (cfg.predictions, cfg.ground_truth, *([args.baseline] if args.baseline else [])):
            check_access(uri, cfg.storage)
        check_access(args.out, cfg.storage, write=True)
        columns = check_inputs(cfg)
    except (ValueError, StorageError) as exc:
        print(f"score: {exc}", file=sys.stderr)
        return 2

    from pipeline.ray_runtime import ensure_ray

    ensure_ray()

    result = score(cfg, columns)
    written = write_report(cfg, result, args.out, baseline=args.baseline)
    doc = written["document"]
    o = doc["overall"]
    counts = doc["inputs"]["counts"]
    print(f"scored {o['count']} expressions ({o['errors']} errors, {counts['bad_masks']} unusable masks) with the "
          f"{cfg.protocol} protocol: "
          f"gIoU {percent(o['giou'])}  cIoU {percent(o['ciou'])}  N-acc {percent(o['n_acc'])}  "
          f"T-acc {percent(o['t_acc'])}  ->  {args.out}")
    if cfg.protocol == "gsva" and counts["forced_mask_missing"]:
        print(f"score: warning: {counts['forced_mask_missing']} rejected targets have no forced_mask (not "
              f"teacher-forced predictions?); they score as empty masks", file=sys.stderr)
    if written["comparison"]:
        print("\n".join(written["comparison"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
