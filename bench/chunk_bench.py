"""What K (expressions per conversation) changes: metrics and speed of the shipped Shapes-GRES model.

    .venv/bin/python bench/chunk_bench.py [--tasks data/shapes4k/tasks/test-00000.parquet] [--images 200]

The GSVA protocol asks every expression of an image in ONE conversation (K = all; Shapes-GRES images have
up to 4 expressions); the predictor and the annotate job chunk a longer list into conversations of at most
``--max-expressions-per-prompt`` (K). This bench runs the same images with K = 1, 2, 4 in generate mode
(forced decoding, the annotate default) and teacher-forced mode, scores them with the score job's functions
(``pipeline.score.metrics``, ReLA protocol, through the train job's validation helper) and times the predict
calls (in process, 4 images per call as annotate's default batch). Results: bench/results/chunk.json and .md.
The task Parquet is the test split of ``python -m jobs.prepare --format shapes --num-images 4000 --seed 0``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gsva.predictor import GSVAPredictor  # noqa: E402
from pipeline.images import decode_image, read_image_bytes  # noqa: E402
from pipeline.score.metrics import ScoreStats, score_expressions  # noqa: E402
from pipeline.train.data import labelled  # noqa: E402
from pipeline.train.validation import REPORTED, expression_inputs  # noqa: E402

RESULTS = REPO / "bench" / "results"
KS = (1, 2, 4)
MODES = ("generate", "teacher-forced")
BATCH = 4  # images per predict call (annotate's default --batch-size)


def load_rows(path: str, n: int) -> tuple[list[np.ndarray], list[list[dict]]]:
    images, exprs = [], []
    for row in pq.read_table(path).to_pylist():
        usable = labelled(row["expressions"])
        if usable:
            data = row["image"] or read_image_bytes(row["image_uri"])
            images.append(decode_image(data, name=str(row["image_id"])))
            exprs.append(usable)
        if len(images) == n:
            break
    return images, exprs


def run(p: GSVAPredictor, images, exprs, mode: str, k: int) -> tuple[dict, float, int]:
    """Metrics, seconds in predict calls, and how many conversations K made."""
    stats, seconds = ScoreStats(), 0.0
    for i in range(0, len(images), BATCH):
        batch = exprs[i:i + BATCH]
        no_target = [[bool(e["no_target"]) for e in es] for es in batch] if mode == "teacher-forced" else None
        start = time.perf_counter()
        results = p.predict(images[i:i + BATCH], [[e["text"] for e in es] for es in batch], mode=mode,
                            no_target=no_target, max_expressions_per_prompt=k)
        seconds += time.perf_counter() - start
        inputs = expression_inputs(list(zip(batch, results)))
        stats = stats + ScoreStats.from_scores(score_expressions(inputs, "rela"), rec_target=~inputs.no_target)
    conversations = sum(-(-len(es) // k) for es in exprs)
    return stats.metrics(), seconds, conversations


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=str(REPO / "data/shapes4k/tasks/test-00000.parquet"))
    ap.add_argument("--checkpoint", default=str(REPO / "checkpoints/shapes-gres"))
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    p = GSVAPredictor.from_checkpoint(args.checkpoint)
    images, exprs = load_rows(args.tasks, args.images)
    n = sum(len(e) for e in exprs)
    rows = []
    for mode in MODES:
        run(p, images[:BATCH], exprs[:BATCH], mode, max(KS))  # warm-up
        for k in KS:
            metrics, seconds, convs = run(p, images, exprs, mode, k)
            rows.append({"mode": mode, "k": k, "conversations": convs, "expressions": n, "seconds": round(seconds, 2),
                         "expr_per_s": round(n / seconds, 2),
                         **{m: None if metrics[m] is None else round(100 * metrics[m], 2) for m in REPORTED}})
            print(json.dumps(rows[-1]), flush=True)
    out = {"checkpoint": os.path.relpath(args.checkpoint, REPO), "model_id": str(p.model_id),
           "tasks": os.path.basename(args.tasks), "images": len(images), "expressions": n,
           "threads": args.threads, "date": time.strftime("%Y-%m-%d"), "protocol": "rela", "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "chunk.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"# Expressions per conversation (K): shipped model `{out['model_id']}`, {out['date']}", "",
             f"{len(images)} images / {n} expressions of `{out['tasks']}` (Shapes-GRES test split), CPU, "
             f"{args.threads} torch threads, {BATCH} images per predict call; metrics in % (ReLA protocol, "
             "pipeline.score.metrics). K = 4 is the GSVA protocol here (all of an image's expressions).", "",
             "| mode | K | conversations | gIoU | cIoU | N-acc | T-acc | expr/s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['k']} | {r['conversations']} | {r['giou']} | {r['ciou']} | {r['n_acc']} | "
              f"{r['t_acc']} | {r['expr_per_s']} |" for r in rows]
    (RESULTS / "chunk.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
