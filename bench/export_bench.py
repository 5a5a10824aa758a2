"""Benchmark: `jobs.export` (pipeline.export.graph.run) on a million prediction rows, both formats.

    python bench/export_bench.py [--rows 1000000] [--files 100] [--num-cpus 4]

Generates predictions (PREDICTION_SCHEMA) and their task shards (TASK_SCHEMA, images referenced, not
embedded) with Shapes-GRES geometry: 96-160 px masks drawn from a pool of real shape RLEs, 4 expressions per
image, 15 % rejected, 2 % error rows, scores uniform in [0, 1]. Then times the COCO export and the task-shard
export (--min-score 0.5) on a local Ray cluster, each after Ray's workers have started, and records the
driver's and the export tasks' peak RSS. Writes bench/results/export.json and export.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import masks  # noqa: E402
from pipeline.export.config import ExportConfig  # noqa: E402
from pipeline.export.graph import run  # noqa: E402
from pipeline.prepare.formats import shapes  # noqa: E402
from pipeline.schemas import PREDICTION_SCHEMA, TASK_SCHEMA  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EXPRESSIONS_PER_IMAGE = 4
POOL = 500  # distinct masks; rows reuse them (the export never looks inside an RLE's counts)
REJECTED, ERRORS = 0.15, 0.02


def mask_pool(rng: np.random.Generator) -> list[dict]:
    pool = []
    for _ in range(POOL):
        h, w = (int(v) for v in rng.integers(*shapes.SIDE_RANGE, size=2))
        s = int(rng.integers(*shapes.SIZE_RANGE))
        cx, cy = int(rng.integers(s, w - s)), int(rng.integers(s, h - s))
        pool.append(masks.from_polygons([shapes.polygon(str(rng.choice(shapes.SHAPES)), cx, cy, s)], h, w))
    return pool


def generate(root: Path, rows: int, files: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    pool = mask_pool(rng)
    preds_dir, tasks_dir = root / "predictions", root / "tasks"
    preds_dir.mkdir(parents=True)
    tasks_dir.mkdir(parents=True)
    per_file = rows // files
    for f in range(files):
        n = per_file
        images = n // EXPRESSIONS_PER_IMAGE
        image_ids = [str(f * images + i + 1) for i in range(images)]
        pick = rng.integers(0, POOL, size=n)
        u = rng.random(n)
        error, rejected = u < ERRORS, (u >= ERRORS) & (u < ERRORS + REJECTED)
        rles = [pool[p] for p in pick]
        mask = [None if e else (masks.empty(*r["size"]) if j else r) for r, e, j in zip(rles, error, rejected)]
        ids = [f"{image_ids[i // EXPRESSIONS_PER_IMAGE]}-{i % EXPRESSIONS_PER_IMAGE}" for i in range(n)]
        texts = [f"expression {i}" for i in range(n)]
        table = pa.table({
            "expression_id": ids, "image_id": [image_ids[i // EXPRESSIONS_PER_IMAGE] for i in range(n)],
            "dataset": ["shapes-gres"] * n, "split": ["train"] * n, "text": texts,
            "rejected": pa.array([None if e else bool(j) for e, j in zip(error, rejected)], pa.bool_()),
            "mask": pa.array(mask, PREDICTION_SCHEMA.field("mask").type), "forced_mask": pa.nulls(n),
            "score": pa.array(np.where(error, np.nan, rng.random(n)), pa.float32(), mask=error),
            "answer": ["Sure, expression:[SEG]."] * n, "status": np.where(error, "error", "ok").tolist(),
            "error": [("model failed" if e else None) for e in error], "model": ["bench"] * n,
            "mode": ["generate"] * n, "note": pa.nulls(n),
        }).cast(PREDICTION_SCHEMA)
        key = f"train-{f:05d}"
        pq.write_table(table, preds_dir / f"{key}.parquet")
        task_rows = [{"image_id": image_ids[i], "image": None, "image_uri": f"images/shapes_{image_ids[i]}.png",
                      "width": rles[i * EXPRESSIONS_PER_IMAGE]["size"][1],
                      "height": rles[i * EXPRESSIONS_PER_IMAGE]["size"][0], "split": "train", "dataset": "shapes-gres",
                      "expressions": [{"expression_id": ids[j], "text": texts[j], "no_target": None, "gt_mask": None,
                                       "gt_boxes": None}
                                      for j in range(i * EXPRESSIONS_PER_IMAGE, (i + 1) * EXPRESSIONS_PER_IMAGE)]}
                     for i in range(images)]
        pq.write_table(pa.Table.from_pylist(task_rows, schema=TASK_SCHEMA), tasks_dir / f"{key}.parquet")
    return preds_dir, tasks_dir


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=100)
    p.add_argument("--num-cpus", type=int, default=4)
    p.add_argument("--note", default="", help="what else ran on the machine (recorded with the results)")
    args = p.parse_args()
    import ray

    from pipeline.ray_runtime import ensure_ray

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        preds, tasks = generate(root, args.rows, args.files)
        gen_s = time.perf_counter() - t0
        ensure_ray(args.num_cpus)
        warm = ExportConfig(predictions=str(preds / "train-00000.parquet"), to="coco", out=str(root / "warm"),
                            tasks=str(tasks)).validate()
        run(warm)  # starts Ray's worker processes; not timed
        runs = {}
        for to, min_score in (("coco", 0.0), ("tasks", 0.5)):
            cfg = ExportConfig(predictions=str(preds), to=to, out=str(root / to), tasks=str(tasks),
                               min_score=min_score).validate()
            t = time.perf_counter()
            summary = run(cfg)
            seconds = time.perf_counter() - t
            runs[to] = {"seconds": round(seconds, 2), "rows_per_s": round(sum(summary.rows.values()) / seconds),
                        "rows": summary.rows, "images": summary.images, "min_score": min_score,
                        "peak_task_rss_mb": round(summary.peak_task_rss_mb, 1),
                        "output_mb": round(du(root / to) / 2**20, 1)}
            print(to, json.dumps(runs[to]), flush=True)
        doc = {"rows": args.rows, "files": args.files, "num_cpus": args.num_cpus, "cores": os.cpu_count(),
               "generate_s": round(gen_s, 1), "input_mb": round(du(preds) / 2**20, 1),
               "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "runs": runs, "note": args.note}
        ray.shutdown()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["| format | rows | files | time (s) | rows/s | peak RSS per export task (MB) | driver peak RSS (MB) "
             "| output (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for to, r in runs.items():
        lines.append(f"| {to} | {args.rows:,} | {args.files} | {r['seconds']} | {r['rows_per_s']:,} | "
                     f"{r['peak_task_rss_mb']} | {doc['driver_peak_rss_mb']} | {r['output_mb']} |")
    lines += ["", "Masks come from a pool of 500 real Shapes-GRES RLEs, so Parquet's dictionary encoding makes the "
              "task shards unusually small; the COCO JSON size is representative.",
              f"Generated in {doc['generate_s']} s ({doc['input_mb']} MB of predictions); {os.cpu_count()} cores, "
              f"local Ray with {args.num_cpus} CPUs. {args.note}".rstrip()]
    (RESULTS / "export.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
