"""Benchmark: one training step of each `make shapes-model` stage, fp32 vs bf16 autocast, 1 vs 2 torch threads.

    python bench/train_step_bench.py [--data data/shapes4k/tasks] [--steps 10] [--warmup 3]

Runs the stages' own code (pipeline.train.stages: draw, loss) in this process, without Ray, from the shipped
checkpoints with each stage's Makefile batch size and policy, and the Makefile's measured alternatives
(``SAM_DENSE=1``: the sam stage's dense loss; ``GSVA_POLICY=llm``: SAM's image encoder frozen): the forward,
backward and AdamW step of a training step, on the same training images in every configuration. Writes
bench/results/train_step.json and train_step.md. The stage walls in the README are the Ray Train runs themselves
(run.json); this isolates the step so the precision and thread choice of the Makefile is a measured one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gsva.checkpoint import combine_bases, load_model  # noqa: E402
from gsva.freeze import freeze  # noqa: E402
from gsva.losses import LossConfig  # noqa: E402
from pipeline.train.data import DecodeRow, labelled  # noqa: E402
from pipeline.train.objects import load_objects  # noqa: E402
from pipeline.train.stages import build_stage  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"

@dataclass(frozen=True)
class Row:
    """One benchmarked configuration: a stage as `make shapes-model` runs it (or ran it before)."""
    name: str
    stage: str
    policy: str
    batch_size: int
    dense_weight: float = 0.0


#: the Makefile's stages (its defaults), then its measured alternatives SAM_DENSE=1 and GSVA_POLICY=llm
ROWS = {r.name: r for r in (Row("clip", "clip", "clip", 32), Row("sam", "sam", "sam", 4),
                            Row("llava", "llava", "mllm", 8), Row("gsva", "gsva", "llm-sam", 8),
                            Row("sam-dense", "sam", "sam", 4, dense_weight=1.0), Row("gsva-llm", "gsva", "llm", 8))}
CONFIGS = [("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)]


def stage_model(stage: str):
    if stage == "gsva":
        model, tokenizer, _ = combine_bases(str(CHECKPOINTS / "shapes-sam-base"),
                                            str(CHECKPOINTS / "shapes-llava-base"))
    else:
        base = "shapes-sam-base" if stage == "sam" else "shapes-llava-base"
        model, tokenizer, _ = load_model(str(CHECKPOINTS / base))
    return model.float(), tokenizer


def draw_all(stage, rows: list[dict], k: int) -> list:
    decode, rng, samples = DecodeRow(), random.Random(0), []
    for row in rows:
        decoded = decode(row)
        expressions = labelled(decoded["expressions"])
        if not decoded["error"] and expressions:
            samples += stage.draw(np.asarray(decoded["pixels"], dtype=np.uint8), expressions,
                                  str(decoded["image_id"]), k, rng)
    return samples


def time_steps(row: Row, stage, samples: list, precision: str, threads: int, steps: int,
               warmup: int) -> float:
    """Median seconds per step (forward + backward + AdamW), fresh model, stage head and optimiser."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch_size = row.batch_size
    model, tokenizer = stage_model(row.stage)
    freeze(model, row.policy, model.cfg.lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    head = stage.make_head(model.cfg)
    if head is not None:
        params += list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    rng, device, times = random.Random(0), torch.device("cpu"), []
    for i in range(warmup + steps):
        batch = [samples[(i * batch_size + j) % len(samples)] for j in range(batch_size)]
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            parts = stage.loss(model, model, batch, tokenizer, rng, LossConfig(), device)
        parts.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/shapes4k/tasks")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--stages", nargs="+", default=list(ROWS), choices=list(ROWS))
    args = parser.parse_args()
    data = Path(args.data)
    rows = pq.read_table(data / "train-00000.parquet").slice(0, 400).to_pylist()
    objects, _ = load_objects(str(data / "raw" / "instances.json"))
    results = []
    for name in args.stages:
        row = ROWS[name]
        drawer = build_stage(row.stage, objects, row.dense_weight)  # the same samples for every configuration
        samples = draw_all(drawer, rows, stage_model(row.stage)[0].cfg.max_expressions_per_prompt)
        for precision, threads in CONFIGS:
            seconds = time_steps(row, drawer, samples, precision, threads, args.steps, args.warmup)
            results.append({"stage": row.stage, "policy": row.policy, "batch_size": row.batch_size,
                            "dense_weight": row.dense_weight, "precision": precision, "threads": threads,
                            "seconds_per_step": round(seconds, 4)})
            print(json.dumps(results[-1]), flush=True)
    load = os.getloadavg()
    meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup,
            "load_average_after": [round(v, 2) for v in load]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_step.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = ["| stage | policy | batch | fp32, 1 thread | fp32, 2 threads | bf16, 1 thread | bf16, 2 threads |",
             "|---|---|---|---|---|---|---|"]
    for name in args.stages:
        row = ROWS[name]
        by = {(r["precision"], r["threads"]): r["seconds_per_step"] for r in results
              if (r["stage"], r["policy"], r["dense_weight"]) == (row.stage, row.policy, row.dense_weight)}
        base = by[("fp32", 1)]
        cells = [f"{by[c]:.3f} s ({base / by[c]:.2f}x)" for c in CONFIGS]
        policy = row.policy + (f", dense weight {row.dense_weight:g}" if row.dense_weight else "")
        lines.append(f"| {row.stage} | {policy} | {row.batch_size} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Median seconds per training step (forward, backward, AdamW) over {args.steps} steps after "
                 f"{args.warmup} warm-up steps, in one process without Ray; {meta['cpus']} CPU cores, torch "
                 f"{meta['torch']}; load average after the run {meta['load_average_after']}.")
    (RESULTS / "train_step.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
