"""Helpers for the annotate tests (no tests here): task-shard writers, a fake segmenter, fault-injecting stages.

Stage subclasses live in an importable module so Ray workers can unpickle them by reference.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.annotate.config import AnnotateConfig, Scheduling
from pipeline.annotate.model import PredictStage
from pipeline.schemas import TASK_SCHEMA

#: Small test pools: fractional CPUs so the 4-logical-CPU test cluster always has room for reads/writes, and
#: at most 2 decode tasks at a time (each extra Ray worker process costs seconds of a 2-core machine).
TEST_SCHEDULING = Scheduling(min_replicas=1, max_replicas=1, cpus_per_replica=0.5, decode_cpus=0.25,
                             decode_tasks=2, batch_size=2, decode_batch_size=4)


def shapes_rows(root: Path, images: int, seed: int = 0) -> list[dict[str, Any]]:
    """Shapes-GRES task rows (images embedded as PNG bytes), generated once per root."""
    from pipeline.prepare.formats import grefcoco, shapes

    if not (root / "instances.json").exists():
        shapes.generate(str(root), images, seed)
    rows = grefcoco.read_task_rows(str(root))
    for row in rows:
        row["image"] = Path(row["image_uri"]).read_bytes()
    return rows


def write_shards(rows: list[dict[str, Any]], folder: Path, per_file: int, prefix: str = "val") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(0, len(rows), per_file):
        path = folder / f"{prefix}-{i // per_file:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[i:i + per_file], schema=TASK_SCHEMA), path)
        paths.append(path)
    return paths


def assert_one_row_per_expression(table: pa.Table, task_rows: list[dict[str, Any]]) -> None:
    """Every (image_id, expression_id) of the task rows appears exactly once in the predictions."""
    expected = Counter((r["image_id"], e["expression_id"]) for r in task_rows for e in r["expressions"] or [])
    got = Counter(zip(table.column("image_id").to_pylist(), table.column("expression_id").to_pylist()))
    assert got == expected


def expression_count(rows: list[dict[str, Any]]) -> int:
    return sum(len(r["expressions"] or []) for r in rows)


def png_bytes(array: np.ndarray) -> bytes:
    """PNG of an array; Pillow picks the mode: (H, W) uint8 -> L, uint16 -> I;16, (H, W, 4) -> RGBA."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def config(input_dir: Path, output_dir: Path, **changes: Any) -> AnnotateConfig:
    base = dict(input=str(input_dir), output=str(output_dir), checkpoint="tiny", scheduling=TEST_SCHEDULING)
    base.update(changes)
    return AnnotateConfig(**base)


def read_predictions(output_dir: Path) -> pa.Table:
    files = sorted((output_dir / "predictions").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})


# --------------------------------------------------------------------------------------------- fake model
@dataclass
class FakeResult:
    decision: str
    rejected: bool
    mask: np.ndarray
    forced_mask: np.ndarray | None
    score: float
    answer: str
    note: str | None


class FakeSegmenter:
    """Deterministic stand-in with GSVAPredictor's predict signature (for fast pipeline unit tests only)."""

    model_id = "fake-segmenter"

    def predict(self, images, expressions, mode="generate", no_target=None, max_expressions_per_prompt=4):
        out = []
        for image, texts in zip(images, expressions):
            results = []
            for text in texts:
                if text == "raise":
                    raise RuntimeError("fake model failure")
                rejected = int(hashlib.sha1(text.encode()).hexdigest(), 16) % 3 == 0
                mask = np.zeros(image.shape[:2], dtype=bool)
                if not rejected:
                    mask[: image.shape[0] // 2, : image.shape[1] // 2] = True
                forced = np.ones(image.shape[:2], dtype=bool) if mode == "teacher-forced" else None
                results.append(FakeResult("rej" if rejected else "seg", rejected, mask, forced, 0.9,
                                          f"Sure,{text}:{'[REJ]' if rejected else '[SEG]'}.", None))
            out.append(results)
        return out


class FakePredictStage(PredictStage):
    def load(self, spec):
        return FakeSegmenter()


class KillOncePredictStage(PredictStage):
    """The real model stage, whose replica SIGKILLs its own process on its second batch, once per test.

    The marker file (created atomically with O_EXCL) makes exactly one replica die exactly once; the
    restarted actor finds it and carries on, so the test sees Ray's real restart and batch re-run.
    Use `kill_once_stage(marker)`: a class made at run time is pickled by value, marker path included.
    """

    marker: str = ""

    def __init__(self, spec):
        super().__init__(spec)
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        if self.marker and self.calls == 2:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def kill_once_stage(marker: Path) -> type:
    return type("KillOnceAt", (KillOncePredictStage,), {"marker": str(marker)})


# --------------------------------------------------------------------------------------------- fault tests
class JobThread:
    """`jobs.annotate.main(argv)` on a thread of the test process (its Ray cluster, its hold folder), so a
    test can hold it at a known point, inject a fault, and read its exit status and output."""

    def __init__(self, argv: list[str]):
        import threading

        self.argv = argv
        self.code: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="annotate-job", daemon=True)

    def _run(self) -> None:
        from jobs.annotate import main

        try:
            self.code = main(self.argv)
        except BaseException as exc:  # noqa: BLE001 - re-raised by join() on the test's thread
            self.error = exc

    def start(self) -> JobThread:
        self.thread.start()
        return self

    def alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout_s: float) -> int:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"the job did not end within {timeout_s:.0f} s"
        if self.error is not None:
            raise self.error
        assert self.code is not None
        return self.code


def job_args(tasks: str, out: str, *extra: str) -> list[str]:
    """The fault tests' annotate command line: tiny model, one small replica, one image per batch."""
    return ["--input", tasks, "--output", out, "--checkpoint", "tiny", "--replicas", "1", "--batch-size", "1",
            "--cpus-per-replica", "0.5", "--decode-tasks", "2", *extra]
