"""`python -m jobs.annotate` as users run it: the embedded default with no arguments, --overwrite, refusals
with one clear message (bad options, another configuration's output, a model that cannot load)."""

from __future__ import annotations

import pyarrow.parquet as pq

import jobs.annotate as job
from pipeline import masks
from pipeline.schemas import PREDICTION_SCHEMA, STATUS_OK
from tests.test_annotate_support import TEST_SCHEDULING, assert_one_row_per_expression, read_predictions

SMALL = ["--replicas", "1", "--batch-size", "2", "--cpus-per-replica", str(TEST_SCHEDULING.cpus_per_replica),
         "--decode-tasks", str(TEST_SCHEDULING.decode_tasks)]


def ours(stderr: str) -> list[str]:
    """The job's own messages (Ray's logging may share stderr)."""
    return [line for line in stderr.splitlines() if line.startswith("annotate:")]


def modes(output) -> set[str]:
    return {m for f in (output / "predictions").glob("*.parquet") for m in pq.read_table(f).column("mode").to_pylist()}


def test_embedded_default_end_to_end_resume_refusal_overwrite(ray_local, tmp_path, monkeypatch, capsys):
    """The acceptance run on local files: no arguments -> Shapes-GRES generated, annotated by the shipped
    Shapes-GRES model on local Ray; then a re-run skips everything, another config is refused, --overwrite
    starts afresh."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(job, "DEFAULT_IMAGES", 8)
    monkeypatch.setattr(job, "DEFAULT_ROWS_PER_FILE", 4)
    assert job.main(SMALL) == 0  # no --input/--output/--checkpoint: the embedded default
    out = capsys.readouterr().out
    output, tasks = tmp_path / "outputs" / "annotate", tmp_path / "data" / "shapes-gres" / "tasks"
    assert "annotate: done" in out and "expressions/s" in out and "model shapes@sha256:" in out
    shards = sorted(tasks.glob("*.parquet"))
    task_rows = [r for f in shards for r in pq.read_table(f).to_pylist()]
    table = read_predictions(output)
    assert table.schema.equals(PREDICTION_SCHEMA)
    assert_one_row_per_expression(table, task_rows)
    assert set(table.column("status").to_pylist()) == {STATUS_OK}
    (model,) = set(table.column("model").to_pylist())
    assert model.startswith("shapes@sha256:") and modes(output) == {"generate"}
    sizes = {r["image_id"]: [r["height"], r["width"]] for r in task_rows}
    for row in table.to_pylist():
        assert row["mask"]["size"] == sizes[row["image_id"]]
        assert not (row["rejected"] and masks.area(row["mask"]))  # a rejected expression has an empty mask
        assert 0.0 <= row["score"] <= 1.0 and row["answer"].startswith("Sure,")
    assert sorted(p.stem for p in (output / "done").iterdir()) == [f.stem for f in shards]
    assert not list((output / "_staging").rglob("*.parquet"))
    gallery = output / "gallery.png"  # make demo ends with a picture of a few images, its path printed
    assert f"gallery: {gallery}" in out and gallery.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert job.main(SMALL) == 0  # resume: everything is complete, nothing runs
    assert f"input files: {len(shards)} ({len(shards)} already complete, 0 written this run)" in \
        capsys.readouterr().out

    assert job.main(SMALL + ["--mode", "teacher-forced"]) == job.EXIT_REFUSED
    err = ours(capsys.readouterr().err)
    assert len(err) == 1 and "refusing to resume" in err[0] and "--overwrite" in err[0]

    assert job.main(SMALL + ["--mode", "teacher-forced", "--overwrite"]) == 0
    assert modes(output) == {"teacher-forced"}


def test_bad_options_are_refused_before_anything_runs(capsys):
    assert job.main(["--replicas", "3,1"]) == job.EXIT_REFUSED
    assert "--replicas" in capsys.readouterr().err
    assert job.main(["--overwrite", "--retry-errors"]) == job.EXIT_REFUSED


def test_model_that_fails_to_load_fails_the_job_with_one_message(ray_local, tmp_path, capsys):
    from gsva.checkpoint import WEIGHTS_FILE, save_checkpoint
    from gsva.predictor import GSVAPredictor
    from tests.test_annotate_support import shapes_rows, write_shards

    predictor = GSVAPredictor.from_checkpoint("tiny")
    checkpoint = tmp_path / "broken-checkpoint"
    save_checkpoint(predictor.model, predictor.tokenizer, str(checkpoint))
    (checkpoint / WEIGHTS_FILE).write_bytes(b"\0" * 64)  # config.json intact, weights corrupt
    write_shards(shapes_rows(tmp_path / "shapes", 2), tmp_path / "tasks", 2)
    code = job.main(["--input", str(tmp_path / "tasks"), "--output", str(tmp_path / "out"),
                     "--checkpoint", str(checkpoint)] + SMALL)
    err = ours(capsys.readouterr().err)
    assert code == job.EXIT_REFUSED
    assert len(err) == 1 and err[0].startswith(f"annotate: cannot load the model from '{checkpoint}'")
    assert not (tmp_path / "out" / "done").exists() or not list((tmp_path / "out" / "done").iterdir())
