"""The train job on a real local Ray cluster: the recipe in process, refusals, and 2 workers that write
checkpoints to S3 and resume from them."""

from __future__ import annotations

import json

import pytest
import torch

from gsva.predictor import GSVAPredictor
from jobs.prepare import main as prepare_main
from jobs.train import main as train_main
from pipeline.train import state
from pipeline.train.config import InitSpec, ScalingSpec, TrainConfig
from pipeline.train.launch import build_trainer, connect_ray, uncached
from pipeline.train.recipe import CURVE_FILE, HISTORY_FILE

#: Small steps on a small dataset: every test trains the tiny preset for a few steps.
TINY = ["--preset", "tiny", "--batch-size", "2", "--shuffle-buffer", "4", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def shapes_tasks(ray_local, tmp_path_factory) -> str:
    """24 Shapes-GRES images (train/val/test), images embedded in the shards."""
    out = str(tmp_path_factory.mktemp("train-data") / "tasks")
    assert prepare_main(["--format", "shapes", "--num-images", "24", "--seed", "3", "--out", out,
                         "--embed-images", "--rows-per-file", "8"]) == 0
    return out


def job_summary(stdout: str) -> dict:
    """The JSON the job prints last."""
    return json.loads(stdout[stdout.rindex('{\n  "checkpoint"'):])


def test_recipe_in_process_reports_loss_parts_lr_throughput_and_validation(shapes_tasks, tmp_path):
    cfg = TrainConfig(data=shapes_tasks, val_data=shapes_tasks, val_max_images=2, output=str(tmp_path / "run"),
                      init=InitSpec(preset="tiny"), max_steps=3, batch_size=2, checkpoint_every=2, shuffle_buffer=4,
                      scaling=ScalingSpec(workers=1)).validate()
    connect_ray(cfg)
    result = build_trainer(cfg, num_workers=0).fit()  # Ray Train's local mode: this process, real Ray Data
    metrics = result.metrics
    assert metrics["step"] == 3
    assert all(metrics[k] > 0 for k in ("loss", "ce", "bce", "dice", "lr", "samples_per_s", "grad_norm"))
    assert metrics["loss"] == pytest.approx(metrics["ce"] + 2 * metrics["bce"] + 0.5 * metrics["dice"], rel=1e-5)
    assert 0 <= metrics["val/giou"] <= 1 and metrics["val/count"] > 0 and "val/n_acc" in metrics
    history = json.loads((tmp_path / "run" / HISTORY_FILE).read_text())
    assert [r["step"] for r in history] == [1, 2, 3]  # rewritten with every checkpoint (steps 2 and 3)
    assert ["val/giou" in r for r in history] == [False, True, True]
    assert (tmp_path / "run" / CURVE_FILE).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("cache", [False, True], ids=["streamed", "cached"])
def test_one_seed_makes_one_run(shapes_tasks, tmp_path, cache):
    """Two runs of one config (seeded block order, ordered ingest, seeded local shuffle and draws) train on
    the same samples in the same order: the same loss at every step, over more than one epoch; so do two
    runs that decode the splits once into the object store (--cache-data)."""
    losses = []
    for name in ("a", "b"):
        cfg = TrainConfig(data=shapes_tasks, output=str(tmp_path / name), init=InitSpec(preset="tiny"),
                          max_steps=12, batch_size=2, checkpoint_every=12, shuffle_buffer=4, cache_data=cache,
                          scaling=ScalingSpec(workers=1)).validate()
        connect_ray(cfg)
        build_trainer(cfg, num_workers=0).fit()
        history = json.loads((tmp_path / name / HISTORY_FILE).read_text())
        assert max(r["epoch"] for r in history) >= 1  # the second epoch's block order and shuffle are seeded too
        losses.append([r["loss"] for r in history])
    assert len(losses[0]) == 12 and losses[0] == losses[1]


def test_cached_split_keeps_the_source_block_order(ray_local):
    """--cache-data decodes a split once; its blocks must come out in the read order, or the seeded shuffle
    starts from whichever decode task finished first. The gate holds block 0's task until block 1's has run,
    so block 1 always finishes first: plain ``materialize()`` gives [1, 0], ``materialize_in_order`` [0, 1]."""
    import asyncio

    import ray

    from pipeline.train.data import materialize_in_order

    @ray.remote
    class Gate:
        def __init__(self):
            self.opened = asyncio.Event()

        async def open(self):
            self.opened.set()

        async def wait(self):
            await self.opened.wait()

    def held(gate):
        def fn(batch):
            if batch["id"][0] == 0:
                ray.get(gate.wait.remote(), timeout=120)  # a failure, not a hang, if block 1 never runs
            else:
                gate.open.remote()
            return batch
        return fn

    def blocks(ds):
        return [int(batch["id"][0]) for batch in ds.iter_batches(batch_size=None)]

    plain = ray.data.range(2, override_num_blocks=2).map_batches(held(Gate.remote()), num_cpus=0.5)
    assert blocks(plain.materialize()) == [1, 0]
    ordered = ray.data.range(2, override_num_blocks=2).map_batches(held(Gate.remote()), num_cpus=0.5)
    assert blocks(materialize_in_order(ordered)) == [0, 1]


def test_job_refuses_to_mix_up_runs(shapes_tasks, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--data", shapes_tasks, "--output", str(run), "--max-steps", "2", *TINY]
    assert train_main([*argv, "--resume"]) == 2
    assert "holds no training run to continue" in capsys.readouterr().err
    (run / "step-0000002").mkdir(parents=True)
    assert train_main(argv) == 2
    assert "already holds a training run: pass --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main([*argv, "--workers", "0"])
    assert "--workers must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_two_workers_checkpoint_to_s3_then_resume(shapes_tasks, s3, tmp_path, capsys):
    output = f"s3://{s3.bucket}/train-test/run"
    argv = ["--data", shapes_tasks, "--output", output, "--s3-endpoint", s3.endpoint, "--workers", "2",
            "--checkpoint-every", "2", "--keep-checkpoints", "2", *TINY]
    assert train_main([*argv, "--max-steps", "4"]) == 0
    summary = job_summary(capsys.readouterr().out)
    assert summary["checkpoint"] == f"{output}/step-0000004" and summary["final"]["step"] == 4
    fs, path = uncached(output, s3.options)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(path, detail=False))
    assert {"step-0000002", "step-0000004", CURVE_FILE, HISTORY_FILE} <= set(names)
    predictor = GSVAPredictor.from_checkpoint(f"{output}/step-0000004/{state.MODEL_DIR}", storage=s3.options)
    assert predictor.model_id.startswith("tiny@sha256:")

    export = tmp_path / "export"
    assert train_main([*argv, "--max-steps", "6", "--resume", "--export", str(export),
                       "--export-dtype", "float16"]) == 0
    summary = job_summary(capsys.readouterr().out)
    assert summary["checkpoint"] == f"{output}/step-0000006" and summary["export"] == str(export)
    kept = sorted(p.rsplit("/", 1)[1] for p in fs.ls(path, detail=False)
                  if fs.exists(f"{p}/{state.STATE_FILE}"))  # an S3 store may list an emptied prefix
    assert kept == ["step-0000004", "step-0000006"]  # --keep-checkpoints 2
    with fs.open(f"{path}/{HISTORY_FILE}") as f:
        history = json.load(f)
    assert [r["step"] for r in history] == list(range(1, 7))
    with fs.open(f"{path}/step-0000006/{state.STATE_FILE}", "rb") as f:
        train_state = torch.load(f, weights_only=True)
    assert [(s["step"], s["resumed"], s["world_size"]) for s in train_state["starts"]] == [(0, False, 2), (4, True, 2)]
    exported = GSVAPredictor.from_checkpoint(str(export))
    assert exported.model.dtype == torch.float32  # loaded as fp32 from fp16 storage
    assert json.loads((export / "config.json").read_text())["weights"]["dtype"] == "float16"
    assert (export / CURVE_FILE).exists()
