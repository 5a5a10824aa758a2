"""Benchmark 3 with a SIMULATED accelerator: what Ray, decode and write cost when the model runs off the CPU.

A 2-core CPU cannot show the job-vs-loop overhead of a GPU deployment with a CPU model (the model itself
takes every core). Here the model call is a sleep of a fixed per-batch latency (time.sleep releases the
GIL, as a CUDA call waiting on the device does) that returns one plausible full-size mask per expression,
so everything around the model is real: Parquet read, PNG decode, RLE encoding, row building, writes,
Ray Data's scheduling. The same simulated replica serves the in-process loop (R threads, one per simulated
accelerator, on pre-decoded images) and the Ray Data job (R replicas). Reported per replica count: the
job/loop ratio and the host CPU seconds per image (all Ray processes; of it, the replicas' own share and
the decode share measured apart).

The default latency is pipeline.cluster.sizing's roofline ESTIMATE for gsva-7b on one H100 (no GPU was measured).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.process_sampler import ProcessTreeCPU

SIMULATED_GPU, SIMULATED_PRESET = "H100-SXM", "gsva-7b"


def estimated_batch_latency_s(batch: int) -> float:
    """pipeline.cluster.sizing's roofline estimate of one generate-mode batch of `batch` images."""
    from pipeline.cluster.sizing import H100, InferenceLoad, images_per_second_per_gpu, shape_from_preset

    assert H100.name == SIMULATED_GPU
    return batch / images_per_second_per_gpu(shape_from_preset(SIMULATED_PRESET), H100,
                                             InferenceLoad(images_per_batch=batch))


@dataclass
class SimulatedResult:
    decision: str
    rejected: bool
    mask: np.ndarray
    forced_mask: None
    score: float
    answer: str
    note: None


class SimulatedAccelerator:
    """GSVAPredictor's predict() signature; each call sleeps `latency_s` (one batch on the device)."""

    model_id = "simulated-accelerator"

    def __init__(self, latency_s: float):
        self.latency_s = latency_s

    def predict(self, images, expressions, mode="generate", no_target=None, max_expressions_per_prompt=4):
        time.sleep(self.latency_s)
        out = []
        for image, texts in zip(images, expressions):
            h, w = image.shape[:2]
            mask = np.zeros((h, w), dtype=bool)
            mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True  # a mask of the image's size, as GSVA's
            out.append([SimulatedResult("seg", False, mask, None, 1.0, "Sure, [SEG].", None) for _ in texts])
        return out


def simulated_loop(images, exprs, batch: int, replicas: int, latency_s: float) -> float:
    """Seconds for R simulated accelerators (one thread each) to run every batch once, on decoded images."""
    batches = [(images[i:i + batch], exprs[i:i + batch]) for i in range(0, len(images), batch)]
    model = SimulatedAccelerator(latency_s)

    def work(share):
        for imgs, exs in share:
            model.predict(imgs, exs)

    threads = [threading.Thread(target=work, args=(batches[r::replicas],)) for r in range(replicas)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def bench_simulated(rows: list[dict], batch: int, replica_counts: list[int], latency_s: float, work: Path,
                    write_shards, measuring_stage) -> dict:
    """The simulated benchmark 3 at each replica count (one local Ray for all); `write_shards` and
    `measuring_stage` are benchmark 3's (task files, a replica stage that records its first call)."""
    import functools

    from pipeline.annotate.config import AnnotateConfig, Scheduling
    from pipeline.annotate.run import run
    from pipeline.images import decode_image
    from pipeline.ray_runtime import ensure_ray

    t0 = time.process_time()
    images = [decode_image(r["image"]) for r in rows]
    decode_cpu_per_image = (time.process_time() - t0) / len(rows)
    exprs = [[e["text"] for e in r["expressions"]] for r in rows]
    tasks = write_shards(rows, work / "sim-tasks")
    ensure_ray()
    results = []
    for replicas in replica_counts:
        stats_dir = work / f"sim-stats-{replicas}"
        stats_dir.mkdir()
        stage = measuring_stage(stats_dir, functools.partial(SimulatedAccelerator, latency_s))
        t_loop = simulated_loop(images, exprs, batch, replicas, latency_s)
        # A replica holding an accelerator needs little host CPU of its own; decode/read/write get the rest.
        sched = Scheduling(min_replicas=replicas, max_replicas=replicas, cpus_per_replica=0.25, decode_cpus=0.5,
                           batch_size=batch)
        cpu = ProcessTreeCPU(marker="MeasuredPredictStage")
        cpu.begin()
        start = time.perf_counter()
        summary = run(AnnotateConfig(input=str(tasks), output=str(work / f"sim-out-{replicas}"),
                                     checkpoint=str(work / "checkpoint-stub"), scheduling=sched), predict_cls=stage)
        t_job = time.perf_counter() - start
        end = time.time()
        total_cpu, replica_cpu = cpu.end()
        first_call = min(json.loads(f.read_text())["first_call"] for f in stats_dir.glob("*.json"))
        assert summary.ok and summary.errors == 0, summary.render()
        n = len(rows)
        results.append({"replicas": replicas, "images": n, "expressions": summary.rows, "loop_s": t_loop,
                        "job_s": t_job, "ratio": t_loop / t_job, "ratio_after_startup": t_loop / (end - first_call),
                        "startup_s": t_job - (end - first_call), "ideal_s": -(-n // batch) / replicas * latency_s,
                        "host_cpu_s_per_image": total_cpu / n, "replica_cpu_s_per_image": replica_cpu / n,
                        "decode_cpu_s_per_image": decode_cpu_per_image,
                        "other_cpu_s_per_image": (total_cpu - replica_cpu) / n - decode_cpu_per_image,
                        "load_average_1min": os.getloadavg()[0]})
    return {"label": "SIMULATED accelerator (sleep per batch), not a GPU measurement", "batch": batch,
            "batch_latency_s": latency_s,
            "latency_source": f"pipeline.cluster.sizing estimate, {SIMULATED_PRESET} on one {SIMULATED_GPU}",
            "runs": results}


def stub_checkpoint(folder: Path) -> str:
    """A folder the driver can fingerprint (the replicas never read it: they simulate the model)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README").write_text("simulated accelerator: no weights\n")
    return str(folder)


def markdown(sim: dict) -> str:
    lines = ["## 3b. Ray Data job vs in-process loop, SIMULATED accelerator", "",
             f"**Simulation, not a GPU measurement**: each model call sleeps {sim['batch_latency_s'] * 1000:.0f} ms "
             f"per batch of {sim['batch']} images ({sim['latency_source']}); everything else is the real job "
             "(Parquet read, PNG decode, RLE encoding, rows, writes, Ray Data). The loop runs the same simulated "
             "replica, one thread per accelerator, on pre-decoded images.", "",
             "| replicas | images | loop s | job s (start-up) | job/loop end to end | job/loop after start-up | "
             "host CPU ms/image (all Ray processes) | of it: replicas (RLE, rows) | decode | read, write, Ray |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sim["runs"]:
        lines.append(f"| {r['replicas']} | {r['images']} | {r['loop_s']:.1f} | {r['job_s']:.1f} "
                     f"({r['startup_s']:.1f}) | **{r['ratio']:.2f}x** | **{r['ratio_after_startup']:.2f}x** | "
                     f"{r['host_cpu_s_per_image'] * 1000:.1f} | "
                     f"{r['replica_cpu_s_per_image'] * 1000:.1f} | {r['decode_cpu_s_per_image'] * 1000:.1f} | "
                     f"{r['other_cpu_s_per_image'] * 1000:.1f} |")
    return "\n".join(lines) + "\n"


def save(sim: dict, folder: Path) -> None:
    (folder / "annotate_simulated.json").write_text(json.dumps(sim, indent=2))
    (folder / "annotate_simulated.md").write_text("# Annotate benchmark 3b (simulated accelerator)\n\n" + markdown(sim))
