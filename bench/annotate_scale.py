"""Scale run of the annotate job: Shapes-GRES task shards through the shipped model, with the driver's and the
replicas' memory sampled over the whole run (it must stay flat: nothing accumulates per image).

    .venv/bin/python bench/annotate_scale.py [--images 10000] [--checkpoint checkpoints/shapes-gres]

Results: bench/results/annotate_scale.json (with the memory time series) and annotate_scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.process_sampler import RSSSampler  # noqa: E402

RESULTS = REPO / "bench" / "results"
ROWS_PER_FILE = 250


def flatness(samples: list[dict], key: str) -> float | None:
    """Least-squares slope (MB per minute) of `key` over the second half of the run (after warm-up)."""
    points = [(s["t_s"], max(s[key]) if isinstance(s[key], list) else s[key]) for s in samples
              if (s[key] if isinstance(s[key], list) else True)]
    points = points[len(points) // 2:]
    if len(points) < 3:
        return None
    n = len(points)
    mt, mv = sum(t for t, _ in points) / n, sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / var if var else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "shapes-gres"))
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sample-every", type=float, default=10.0, help="seconds between memory samples")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    from jobs import prepare
    from pipeline.annotate.config import AnnotateConfig, Scheduling
    from pipeline.annotate.run import run
    from pipeline.ray_runtime import ensure_ray

    with tempfile.TemporaryDirectory(prefix="annotate-scale-") as tmp:
        tasks = Path(tmp) / "tasks"
        t = time.perf_counter()
        assert prepare.main(["--format", "shapes", "--num-images", str(args.images), "--seed", "0",
                             "--rows-per-file", str(ROWS_PER_FILE), "--out", str(tasks)]) == 0
        prepare_s = time.perf_counter() - t
        ensure_ray()
        cpus = max(1.0, float((os.cpu_count() or 2) // args.replicas))
        sched = Scheduling(min_replicas=args.replicas, max_replicas=args.replicas, cpus_per_replica=cpus,
                           batch_size=args.batch)
        config = AnnotateConfig(input=str(tasks), output=str(Path(tmp) / "out"), checkpoint=args.checkpoint,
                                scheduling=sched)
        with RSSSampler({"replicas_mb": "PredictStage"}, interval_s=args.sample_every) as memory:
            summary = run(config)
    assert summary.ok, summary.render()
    peaks = memory.peaks()
    record = {"images": args.images, "expressions": summary.rows, "errors": summary.errors,
              "seconds": round(summary.seconds, 1), "expressions_per_s": round(summary.rows / summary.seconds, 2),
              "replicas": args.replicas, "cpus_per_replica": cpus, "batch": args.batch, "model": summary.model,
              "prepare_s": round(prepare_s, 1), "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
              "peak_rss_mb": peaks,
              "rss_slope_mb_per_min_second_half": {"driver": flatness(memory.samples, "driver_mb"),
                                                   "replicas": flatness(memory.samples, "replicas_mb"),
                                                   "driver_private": flatness(memory.samples, "driver_private_mb"),
                                                   "replicas_private": flatness(memory.samples,
                                                                                "replicas_private_mb")},
              "samples": memory.samples, "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "annotate_scale.json").write_text(json.dumps(record, indent=2))
    slope = record["rss_slope_mb_per_min_second_half"]
    md = (f"# Annotate at scale ({record['date']}, {record['cpus']} CPUs, load {record['load_average_1min']:.1f})\n\n"
          f"{args.images:,} Shapes-GRES images, {summary.rows:,} expressions ({summary.errors} errors), model "
          f"{summary.model}, {args.replicas} replica(s) x {cpus} CPUs, batch {args.batch}: {record['seconds']} s, "
          f"**{record['expressions_per_s']} expressions/s** end to end.\n\n"
          f"Peak RSS: driver {peaks['driver_mb']:.0f} MB, replica {peaks['replicas_mb']:.0f} MB, largest other Ray "
          f"worker {peaks['largest_other_worker_mb']:.0f} MB (sampled every {args.sample_every:.0f} s, "
          f"{len(memory.samples)} samples). Slope over the second half of the run: driver "
          f"{(slope['driver'] or 0):+.1f} MB/min, replica {(slope['replicas'] or 0):+.1f} MB/min.\n\n"
          f"Private RSS (RSS less shared pages, i.e. less the Ray object-store pages a replica maps when it reads "
          f"its input blocks zero-copy): driver peak {peaks['driver_private_mb']:.0f} MB, replica peak "
          f"{peaks['replicas_private_mb']:.0f} MB; slope over the second half: driver "
          f"{(slope['driver_private'] or 0):+.1f} MB/min, replica {(slope['replicas_private'] or 0):+.1f} MB/min.\n")
    (out / "annotate_scale.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
