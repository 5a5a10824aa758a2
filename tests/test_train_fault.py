"""Faults and sharding on a real local Ray cluster: a worker process killed mid-training (Ray Train restarts
the group from the latest checkpoint), and FSDP2 across 2 CPU workers (gloo)."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import psutil
import pytest
import torch

from gsva.predictor import GSVAPredictor
from jobs.train import main as train_main
from pipeline.train import state
from pipeline.train.launch import RAY_SNAPSHOT_FILE
from pipeline.train.recipe import HISTORY_FILE
from tests.test_train_job import TINY, shapes_tasks  # noqa: F401 - the module fixture is shared

WATCH_TIMEOUT_S = 600


def train_workers() -> list[psutil.Process]:
    """This session's Ray Train worker processes (descendants of this process: our local cluster only)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def registered_steps(run_dir) -> list[int]:
    """Checkpoint steps Ray Train has registered (its manager snapshot names their folders)."""
    snapshot = run_dir / RAY_SNAPSHOT_FILE
    text = snapshot.read_text() if snapshot.exists() else ""
    return [int(m) for m in re.findall(r"step-(\d{7})", text)]


def kill_a_worker_after(run_dir, step: int, seen: dict) -> None:
    """Once Ray Train has registered the checkpoint of ``step``, SIGKILL one training worker process."""
    deadline = time.time() + WATCH_TIMEOUT_S
    while time.time() < deadline:
        steps = registered_steps(run_dir)
        workers = train_workers()
        if steps and max(steps) >= step and workers:
            seen["latest"], seen["pid"] = max(steps), workers[-1].pid
            os.kill(workers[-1].pid, signal.SIGKILL)
            return
        time.sleep(0.1)


@pytest.mark.slow
def test_killed_worker_restarts_the_group_from_the_latest_checkpoint(shapes_tasks, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    seen: dict = {}
    watcher = threading.Thread(target=kill_a_worker_after, args=(run_dir, 4, seen), daemon=True)
    watcher.start()
    code = train_main(["--data", shapes_tasks, "--output", str(run_dir), "--workers", "2", "--max-steps", "8",
                       "--checkpoint-every", "2", "--keep-checkpoints", "5", "--max-failures", "2", *TINY])
    watcher.join(timeout=5)
    assert code == 0 and "pid" in seen, seen
    assert not psutil.pid_exists(seen["pid"]) or psutil.Process(seen["pid"]).status() == psutil.STATUS_ZOMBIE
    final = torch.load(run_dir / "step-0000008" / state.STATE_FILE, weights_only=True)
    starts = [(s["step"], s["resumed"]) for s in final["starts"]]
    latest_at_kill = seen["latest"]
    assert len(starts) == 2 and starts[0] == (0, False) and starts[1][1] is True
    restart = starts[1][0]
    # Resumed from the checkpoint that was latest when the worker died (or a later one registered while
    # the group was going down): at most one checkpoint interval of work is lost.
    assert restart >= latest_at_kill and restart % 2 == 0 and restart < 8
    history = json.loads((run_dir / HISTORY_FILE).read_text())
    assert [r["step"] for r in history] == list(range(1, 9))


@pytest.mark.slow
def test_fsdp_on_two_cpu_workers_trains_validates_and_checkpoints(shapes_tasks, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    code = train_main(["--data", shapes_tasks, "--val-data", shapes_tasks, "--val-max-images", "2", "--output",
                       str(run_dir), "--workers", "2", "--strategy", "fsdp", "--max-steps", "2",
                       "--checkpoint-every", "2", "--full", *TINY])
    assert code == 0
    history = json.loads((run_dir / HISTORY_FILE).read_text())
    assert [r["step"] for r in history] == [1, 2] and 0 <= history[-1]["val/giou"] <= 1
    final = torch.load(run_dir / "step-0000002" / state.STATE_FILE, weights_only=True)
    assert final["starts"][0]["world_size"] == 2 and final["optimizer"]["state"]  # gathered, unsharded
    predictor = GSVAPredictor.from_checkpoint(str(run_dir / "step-0000002" / state.MODEL_DIR))
    trained = set(final["optimizer"]["state"])  # full names, as in the model (params without grads have none)
    assert "mllm.lm_head.weight" in trained and trained <= {n for n, _ in predictor.model.named_parameters()}
