"""Benchmark: the Ray scorer against a straightforward per-expression loop, on Shapes-GRES-sized data.

    python bench/score_bench.py [--expressions 100000] [--protocol rela] [--num-cpus N] [--data DIR]

Generates task shards and predictions in the real Parquet schemas (Shapes-GRES geometry: 96-160 px
images, circles / squares / triangles of radius 8-18, 45 % single, 35 % multi, 20 % no-target
expressions; predictions are jittered shapes with rejections, error rows and missing rows) in a child
process (so the measured driver holds none of them; `--data` keeps them for later runs), then in one
run times
  - ours: `pipeline.score.graph.score` on a local Ray cluster (Parquet read, join, RLE statistics, reduction),
    the second of two runs on the same data: the first starts Ray's worker processes (its time, start-up
    included, is reported as `first_run_s`);
  - the loop: read both sides with pyarrow, then `tests.metrics_reference.reference_score`, which
    decodes both masks of every expression to numpy and computes the IoU there;
asserts that both give the same numbers, and writes bench/results/score.json plus a markdown line, with the
measured run's CPU seconds and the peak RSS and private RSS (RSS less the shared object-store pages) of the
driver and the largest Ray worker.
It also writes the example report of the README (`jobs.score` on the first 200 images, rendered as
Shapes-GRES pictures) to bench/results/score_report/.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.process_sampler import ProcessTreeCPU, RSSSampler  # noqa: E402
from pipeline import masks  # noqa: E402
from pipeline.prepare.formats import shapes  # noqa: E402
from pipeline.schemas import PREDICTION_SCHEMA, TASK_SCHEMA  # noqa: E402
from tests.metrics_reference import reference_score  # noqa: E402

EXPRESSIONS_PER_IMAGE = 4
KIND_P = (0.45, 0.35, 0.20)  # single, multi, no-target
SHARDS = 8
COLOURS = ((220, 40, 40), (40, 170, 60), (40, 80, 220), (230, 200, 40))
NOISE_SIGMA = 6
REPORT_IMAGES = 200  # rendered: the data of the example report
GENERATED = "_generated.json"  # what a --data folder holds: expressions, seed, images
RESULT = Path(__file__).resolve().parent / "results" / "score.json"
REPORT = Path(__file__).resolve().parent / "results" / "score_report"


def _polygon(shape: int, cx: float, cy: float, s: float) -> list[float]:
    """Shape index 0/1/2 (circle/square/triangle) -> the Shapes-GRES polygon."""
    return shapes.polygon(shapes.SHAPES[shape], cx, cy, s)


def generate(n_images: int, seed: int) -> tuple[list[dict], list[dict], list[list[tuple]]]:
    """Task rows, prediction rows, and per image the drawn objects (shape, cx, cy, s) for rendering."""
    rng = np.random.default_rng(seed)
    tasks, preds, scenes = [], [], []
    for i in range(n_images):
        scenes.append([])
        h, w = int(rng.integers(96, 161)), int(rng.integers(96, 161))
        split = ("train", "val", "test")[int(rng.choice(3, p=(0.8, 0.1, 0.1)))]
        exprs = []
        for e in range(EXPRESSIONS_PER_IMAGE):
            eid = f"{i}-{e}"
            kind = int(rng.choice(3, p=KIND_P))
            n_obj = 0 if kind == 2 else (1 if kind == 0 else int(rng.integers(2, 4)))
            objs = [(int(rng.integers(3)), float(rng.integers(19, w - 19)), float(rng.integers(19, h - 19)),
                     float(rng.integers(8, 19))) for _ in range(n_obj)]
            scenes[-1] += objs
            parts = [masks.from_polygons([_polygon(*o)], h, w) for o in objs]
            exprs.append({"expression_id": eid, "text": f"expression {eid}", "no_target": n_obj == 0,
                          "gt_mask": masks.union(parts, h, w), "gt_boxes": [masks.to_bbox(p) for p in parts]})
            r = rng.random()
            if r > 0.997:
                continue  # missing prediction
            moved = [(o[0], o[1] + rng.normal(0, 2), o[2] + rng.normal(0, 2), o[3] * rng.uniform(0.85, 1.15))
                     for o in objs]
            guess = masks.union([masks.from_polygons([_polygon(*o)], h, w) for o in moved], h, w)
            if n_obj == 0:
                guess = masks.from_polygons([_polygon(int(rng.integers(3)), w / 2, h / 2, 10.0)], h, w)
            rejected = (n_obj == 0 and r < 0.7) or (n_obj > 0 and r < 0.03)
            error = r > 0.99
            preds.append({"expression_id": eid, "image_id": str(i), "dataset": "shapes-gres", "split": split,
                          "text": exprs[-1]["text"], "rejected": rejected,
                          "mask": None if error else (masks.empty(h, w) if rejected else guess),
                          "forced_mask": None if error else guess, "score": 0.9, "answer": "",
                          "status": "error" if error else "ok", "error": "bench" if error else None,
                          "model": "bench", "mode": "teacher-forced"})
        tasks.append({"image_id": str(i), "image": None, "image_uri": f"images/shapes_{i:06d}.png",
                      "width": w, "height": h, "split": split, "dataset": "shapes-gres", "expressions": exprs})
    return tasks, preds, scenes


def render(task: dict, scene: list[tuple], rng: np.random.Generator) -> bytes:
    """A Shapes-GRES-style PNG: grey background, each object painted exactly where pycocotools rasterises
    its polygon (so the ground truth matches the pixels), Gaussian noise sigma 6."""
    from PIL import Image

    h, w = task["height"], task["width"]
    pixels = np.full((h, w, 3), float(rng.integers(170, 236)))
    for obj in scene:
        pixels[masks.decode(masks.from_polygons([_polygon(*obj)], h, w))] = COLOURS[int(rng.integers(len(COLOURS)))]
    pixels += rng.normal(0, NOISE_SIGMA, pixels.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write(tasks: list[dict], preds: list[dict], root: Path) -> None:
    for side, rows, schema in (("gt", tasks, TASK_SCHEMA), ("pred", preds, PREDICTION_SCHEMA)):
        (root / side).mkdir(parents=True, exist_ok=True)
        for s in range(SHARDS):
            pq.write_table(pa.Table.from_pylist(rows[s::SHARDS], schema=schema), root / side / f"{s:03d}.parquet")


def _generate_into(data: Path, expressions: int, seed: int) -> None:
    """Generate and write the benchmark's files under `data` (full/ and warm/, the rendered report subset)."""
    tasks, preds, scenes = generate(expressions // EXPRESSIONS_PER_IMAGE, seed)
    write(tasks, preds, data / "full")
    rng = np.random.default_rng(seed)
    shown = [dict(t, image=render(t, scene, rng)) for t, scene in zip(tasks[:REPORT_IMAGES], scenes)]
    ids = {t["image_id"] for t in shown}
    write(shown, [p for p in preds if p["image_id"] in ids], data / "warm")
    (data / GENERATED).write_text(json.dumps({"expressions": expressions, "seed": seed, "images": len(tasks)}))


def prepare_data(data: Path, expressions: int, seed: int) -> int:
    """The benchmark's files under `data`, generated in a child process (so the measured driver never holds
    the generated rows) unless a previous run left them there for the same size and seed; returns the image
    count."""
    marker = data / GENERATED
    wanted = {"expressions": expressions, "seed": seed}
    if not (marker.exists() and {k: json.loads(marker.read_text())[k] for k in wanted} == wanted):
        child = multiprocessing.get_context("spawn").Process(target=_generate_into, args=(data, expressions, seed))
        child.start()
        child.join()
        if child.exitcode:
            raise RuntimeError(f"generating the benchmark data failed (exit {child.exitcode})")
    return json.loads(marker.read_text())["images"]


def loop_baseline(root: Path, protocol: str) -> dict:
    """The straightforward scorer, reading the same files."""
    gt = pq.read_table(root / "gt", columns=["split", "dataset", "expressions"]).to_pylist()
    rows = [dict(e, split=t["split"], dataset=t["dataset"]) for t in gt for e in t["expressions"]]
    preds = pq.read_table(root / "pred").to_pylist()
    return reference_score(rows, preds, protocol)


def same(a: dict, b: dict) -> list[str]:
    """Names of metrics that differ (floats beyond 1e-12 from summation order)."""
    bad = []
    for k, v in b.items():
        w = a[k]
        if (v is None) != (w is None) or (v is not None and not math.isclose(v, w, rel_tol=0, abs_tol=1e-12)):
            bad.append(k)
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--expressions", type=int, default=100_000)
    p.add_argument("--protocol", default="rela", choices=("rela", "gsva"))
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULT))
    p.add_argument("--report", default=str(REPORT), help="where the example report goes ('' for none)")
    p.add_argument("--data", default="",
                   help="folder for the generated data, reused by later runs of the same size and seed "
                        "(default: a temporary folder)")
    p.add_argument("--no-loop", action="store_true",
                   help="skip the per-expression loop (and the identity check): scale runs time the scorer only")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from jobs import score as score_job
    from pipeline.score.graph import ScoreConfig, score

    with tempfile.TemporaryDirectory(prefix="score-bench-") as tmp:
        data = Path(args.data) if args.data else Path(tmp)
        t = time.perf_counter()
        images = prepare_data(data, args.expressions, args.seed)
        gen_s = time.perf_counter() - t
        root, warm = data / "full", data / "warm"

        t = time.perf_counter()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        init_s = time.perf_counter() - t
        t = time.perf_counter()
        score(ScoreConfig(str(root / "pred"), str(root / "gt"), protocol=args.protocol))
        warm_s = time.perf_counter() - t

        t = time.perf_counter()
        load_before = os.getloadavg()[0]
        cpu = ProcessTreeCPU("ray::")  # CPU seconds of the measured run: a figure the machine's load leaves alone
        cpu.begin()
        with RSSSampler({}, interval_s=0.5) as memory:  # the measured run's driver and Ray workers
            result = score(ScoreConfig(str(root / "pred"), str(root / "gt"), protocol=args.protocol))
        ours_s = time.perf_counter() - t
        cpu_total_s, cpu_workers_s = cpu.end()
        if args.report:
            score_job.main(["--predictions", str(warm / "pred"), "--ground-truth", str(warm / "gt"),
                            "--out", args.report, "--protocol", args.protocol])
        ray.shutdown()

        t = time.perf_counter()
        reference = None if args.no_loop else loop_baseline(root, args.protocol)
        loop_s = time.perf_counter() - t

    ours = result.overall.metrics()
    differ = [] if reference is None else same(ours, reference["overall"])
    for name, stats in result.groups.items():
        differ += [f"{name}:{k}" for k in same(stats.metrics(), reference[name])] if reference else []
    ratio = loop_s / ours_s if reference else float("nan")
    record = {
        "expressions": ours["count"], "images": images, "protocol": args.protocol, "num_cpus": args.num_cpus,
        "ours_s": round(ours_s, 3), "loop_s": round(loop_s, 3), "speedup": round(ratio, 2),
        "identical": not differ if reference else None, "ray_init_s": round(init_s, 2),
        "first_run_s": round(warm_s, 2),
        "cpu_s": {"total": round(cpu_total_s, 2), "ray_workers": round(cpu_workers_s, 2)},
        "generate_s": round(gen_s, 2), "load_average_1min": round(os.getloadavg()[0], 2),
        "load_average_1min_before": round(load_before, 2), "metrics": ours,
        "peak_rss_mb": {"driver": memory.peaks()["driver_mb"], "largest_ray_worker": memory.peaks()[
            "largest_other_worker_mb"]},
        # RSS less shared pages (the object store's, mapped by every worker that reads a block zero-copy)
        "peak_private_rss_mb": {"driver": memory.peaks()["driver_private_mb"],
                                "largest_ray_worker": memory.peaks()["largest_other_worker_private_mb"]},
    }
    rss, private = record["peak_rss_mb"], record["peak_private_rss_mb"]
    memory_text = (f"peak RSS: driver {rss['driver']:.0f} MB, largest Ray worker {rss['largest_ray_worker']:.0f} MB "
                   f"(private {private['largest_ray_worker']:.0f} MB) | CPU {cpu_total_s:.1f} s "
                   f"(Ray workers {cpu_workers_s:.1f} s) | {args.num_cpus} CPUs | load {load_before:.1f} -> "
                   f"{os.getloadavg()[0]:.1f}")
    line = (f"| {ours['count']:,} expressions ({args.protocol}) | ours {ours_s:.2f} s | per-expression dense loop "
            f"{loop_s:.2f} s | **{ratio:.1f}x** (first run, Ray workers starting: {warm_s:.1f} s = "
            f"{loop_s / warm_s:.1f}x) | {memory_text} "
            f"| identical: {'yes' if not differ else 'NO ' + ', '.join(differ)} |")
    if reference is None:
        line = (f"| {ours['count']:,} expressions ({args.protocol}) | ours {ours_s:.2f} s (first run, Ray workers "
                f"starting: {warm_s:.1f} s) | {memory_text} | no loop baseline run |")
    record["markdown"] = line
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "metrics"}, indent=2))
    print(line)
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
