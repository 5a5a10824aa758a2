"""Hostile input through the real jobs on real local Ray (tiny model): prepare -> annotate loses no row.

One prepare + annotate pipeline over four input folders is run once (module fixture); each test asserts one rule:
  a/  a 16-row manifest with a missing image and a whitespace-only expression -> 16 prediction rows (14 ok)
  b/  a manifest of hostile paths: a symlink leaving the dataset root, a FIFO, /dev/zero, /dev/urandom
  c/  a hand-written task shard referencing device files and a FIFO directly (annotate's own guard)
  d/  a task shard with wrong column types (image_id int64) -> one unreadable-input line, the rest written
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import jobs.annotate as annotate_job
from jobs.prepare import main as prepare_main
from pipeline.schemas import STATUS_ERROR, STATUS_OK, TASK_SCHEMA
from pipeline.tasks import SUMMARY_FILE, list_shards
from tests.test_annotate_job import SMALL, ours

GOOD_IMAGES = 4
HOSTILE_TIMEOUT_S = 600  # a FIFO or /dev/zero used to hang or exhaust memory: fail instead of waiting forever


def _png(path, seed: int, size=(12, 16)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def _write_manifest(path, records) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def _task_row(image_id, uri, *expression_ids) -> dict:
    return {"image_id": image_id, "image": None, "image_uri": uri, "width": None, "height": None, "split": "all",
            "dataset": "hostile", "expressions": [{"expression_id": e, "text": "the thing", "no_target": None}
                                                  for e in expression_ids]}


def _predictions(out, prefix: str) -> list[dict]:
    rows = []
    for f in sorted((out / "predictions").glob(f"{prefix}__*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


@pytest.fixture(scope="module")
def hostile(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data, elsewhere = root / "data", root / "elsewhere"
    (data / "imgs").mkdir(parents=True)
    elsewhere.mkdir()
    for i in range(GOOD_IMAGES):
        _png(data / "imgs" / f"{i}.png", i)
    _png(elsewhere / "x.png", 99)
    os.symlink(elsewhere / "x.png", data / "imgs" / "link.png")  # leaves the root
    os.symlink(data / "imgs" / "0.png", data / "imgs" / "inside.png")  # stays inside: fine
    os.symlink("/dev/zero", data / "imgs" / "zero.png")  # leaves the root (to a device)
    os.mkfifo(data / "imgs" / "pipe.png")
    os.mkfifo(root / "pipe-outside.png")
    tasks = root / "tasks"

    # a/: 16 rows, 14 good (4 images x 3 + 2 more), one missing image, one whitespace-only expression.
    good = [{"image": f"imgs/{i % GOOD_IMAGES}.png", "expression": f"thing number {i}"} for i in range(14)]
    bad = [{"image": "imgs/gone.png", "expression": "a missing image"},
           {"image": "imgs/1.png", "expression": "   "}]
    manifest_a = _write_manifest(data / "sixteen.jsonl", good[:7] + bad[:1] + good[7:] + bad[1:])
    assert prepare_main(["--format", "manifest", "--root", manifest_a, "--out", str(tasks / "a")]) == 0

    # b/: hostile paths next to two good rows.
    records_b = [{"image": "imgs/2.png", "expression": "good one", "id": "b-good"},
                 {"image": "imgs/inside.png", "expression": "a link inside the root", "id": "b-inside"},
                 {"image": "imgs/link.png", "expression": "a link leaving the root", "id": "b-link"},
                 {"image": "imgs/zero.png", "expression": "a link to a device", "id": "b-zero-link"},
                 {"image": "imgs/pipe.png", "expression": "a fifo", "id": "b-fifo"},
                 {"image": "/dev/zero", "expression": "zeros forever", "id": "b-dev-zero"},
                 {"image": "/dev/urandom", "expression": "noise forever", "id": "b-dev-urandom"}]
    manifest_b = _write_manifest(data / "paths.jsonl", records_b)
    assert prepare_main(["--format", "manifest", "--root", manifest_b, "--out", str(tasks / "b")]) == 0
    embedded = root / "embedded"
    assert prepare_main(["--format", "manifest", "--root", manifest_b, "--out", str(embedded),
                         "--embed-images"]) == 0

    # c/: a shard (not written by prepare) whose image_uri points straight at devices and a FIFO.
    (tasks / "c").mkdir()
    rows_c = [_task_row("c-good", str(data / "imgs" / "3.png"), "c-good-0"),
              _task_row("c-dev-zero", "/dev/zero", "c-dev-zero-0"),
              _task_row("c-dev-urandom", "/dev/urandom", "c-dev-urandom-0"),
              _task_row("c-fifo", str(root / "pipe-outside.png"), "c-fifo-0")]
    pq.write_table(pa.Table.from_pylist(rows_c, schema=TASK_SCHEMA), tasks / "c" / "all-00000.parquet")

    # d/: the same rows as a good shard, and one with image_id stored as int64.
    (tasks / "d").mkdir()
    good_d = [_task_row("d-good", str(data / "imgs" / "0.png"), "d-good-0")]
    pq.write_table(pa.Table.from_pylist(good_d, schema=TASK_SCHEMA), tasks / "d" / "all-00000.parquet")
    wrong = pa.Table.from_pylist([_task_row("7", str(data / "imgs" / "0.png"), "d-int-0")], schema=TASK_SCHEMA)
    wrong = wrong.set_column(0, pa.field("image_id", pa.int64()), pa.array([7], pa.int64()))
    pq.write_table(wrong, tasks / "d" / "all-00001.parquet")

    out = root / "out"
    code = annotate_job.main(["--input", str(tasks), "--output", str(out), "--checkpoint", "tiny", *SMALL])
    return {"root": root, "tasks": tasks, "embedded": embedded, "out": out, "code": code}


@pytest.mark.timeout(HOSTILE_TIMEOUT_S)
def test_every_manifest_row_yields_one_prediction_row(hostile):
    """Defect 1: a missing image and a whitespace-only expression are carried as flagged rows, not dropped."""
    summary = json.loads((hostile["tasks"] / "a" / SUMMARY_FILE).read_text())
    assert summary["expressions"] == 16 and summary["skipped"] == {}
    assert {r: (v["items"], v["expressions"]) for r, v in summary["flagged"].items()} == {
        "missing image": (1, 1), "empty sentence": (1, 1)}
    rows = _predictions(hostile["out"], "a")
    assert len(rows) == 16
    assert sum(r["status"] == STATUS_OK for r in rows) == 14
    errors = {r["text"]: r["error"] for r in rows if r["status"] == STATUS_ERROR}
    assert set(errors) == {"a missing image", "   "}
    assert "missing image" in errors["a missing image"] and "gone.png" in errors["a missing image"]
    assert "empty" in errors["   "]
    assert all(r["mask"] is None for r in rows if r["status"] == STATUS_ERROR)


@pytest.mark.timeout(HOSTILE_TIMEOUT_S)
def test_symlinks_leaving_the_root_are_error_rows(hostile):
    """Defect 2: the real path decides; a link inside the root is fine, one leaving it is refused."""
    rows = {r["expression_id"]: r for r in _predictions(hostile["out"], "b")}
    assert len(rows) == 7
    assert rows["b-good"]["status"] == rows["b-inside"]["status"] == STATUS_OK
    for eid in ("b-link", "b-zero-link"):
        assert rows[eid]["status"] == STATUS_ERROR and "escapes the dataset root" in rows[eid]["error"], eid
    shard_rows = [r for f in list_shards(str(hostile["tasks"] / "b")) for r in pq.read_table(f).to_pylist()]
    for row in shard_rows:  # the escaping file's bytes are never stored, nor its path used for reading
        assert row["image"] is None
        if row["image_id"] == "imgs/link.png":
            assert row["image_uri"] is None and "escapes" in row["error"]


@pytest.mark.timeout(HOSTILE_TIMEOUT_S)
def test_device_files_and_fifos_are_error_rows(hostile):
    """Defect 3: regular files only, checked before opening, in prepare (both modes) and in annotate."""
    rows = {r["expression_id"]: r for r in _predictions(hostile["out"], "b")}
    for eid in ("b-fifo", "b-dev-zero", "b-dev-urandom"):
        assert rows[eid]["status"] == STATUS_ERROR and "not a regular file" in rows[eid]["error"], eid
    rows_c = {r["expression_id"]: r for r in _predictions(hostile["out"], "c")}
    assert rows_c["c-good-0"]["status"] == STATUS_OK
    for eid in ("c-dev-zero-0", "c-dev-urandom-0", "c-fifo-0"):
        assert rows_c[eid]["status"] == STATUS_ERROR and "not a regular file" in rows_c[eid]["error"], eid
    # --embed-images: the good rows are embedded, the hostile ones carried with their reason and no bytes.
    shard = [r for f in list_shards(str(hostile["embedded"])) for r in pq.read_table(f).to_pylist()]
    by_id = {r["image_id"]: r for r in shard}
    assert by_id["imgs/2.png"]["image"] == (hostile["root"] / "data" / "imgs" / "2.png").read_bytes()
    assert by_id["imgs/inside.png"]["image"] is not None and by_id["imgs/inside.png"]["error"] is None
    for image_id in ("imgs/pipe.png", "/dev/zero", "/dev/urandom"):
        assert by_id[image_id]["image"] is None and "not a regular file" in by_id[image_id]["error"], image_id
    summary = json.loads((hostile["embedded"] / SUMMARY_FILE).read_text())
    assert summary["flagged"]["not a regular file"]["items"] == 3


@pytest.mark.timeout(HOSTILE_TIMEOUT_S)
def test_wrong_column_types_are_one_unreadable_input_line(hostile, capsys):
    """Defect 4: the int64 image_id shard is reported (columns and types), its neighbour is written, exit 1."""
    assert hostile["code"] == annotate_job.EXIT_PROBLEMS
    done = sorted(p.stem for p in (hostile["out"] / "done").iterdir())
    assert done == ["a__all-00000", "b__all-00000", "c__all-00000", "d__all-00000"]
    assert [r["expression_id"] for r in _predictions(hostile["out"], "d")] == ["d-good-0"]


def test_wrong_column_types_message(hostile, tmp_path, capsys):
    """The same run again (everything else is complete): the one line names the shard, column and types."""
    code = annotate_job.main(["--input", str(hostile["tasks"]), "--output", str(hostile["out"]),
                              "--checkpoint", "tiny", *SMALL])
    out = capsys.readouterr()
    assert code == annotate_job.EXIT_PROBLEMS
    lines = [line for line in out.out.splitlines() if "UNREADABLE INPUT" in line]
    assert len(lines) == 1 and "all-00001.parquet" in lines[0]
    assert "image_id: int64 (expected string)" in lines[0]
    assert not ours(out.err) and "Traceback" not in out.err + out.out


def test_train_and_score_treat_flagged_rows_sensibly(ray_local, tmp_path):
    """Flagged rows of a ground-truth dataset (a missing image, a path leaving the root): train skips and counts
    them without reading anything; score counts their error predictions against the model, no crash."""
    import random

    from jobs import score as score_job
    from pipeline.train.data import EpochStats, iterate_rows, sample_batches, task_dataset
    from tests import coco_samples as cs

    root = cs.write_grefcoco(tmp_path / "grefcoco")
    tasks = tmp_path / "tasks"
    assert prepare_main(["--format", "grefcoco", "--root", str(root), "--out", str(tasks), "--embed-images"]) == 0
    rows = [r for f in list_shards(str(tasks)) for r in pq.read_table(f).to_pylist()]
    flagged = {r["image_id"] for r in rows if r["error"]}
    assert flagged == {"3", "5"}

    stats = EpochStats()
    batches = list(sample_batches(iterate_rows(task_dataset(str(tasks), "testA", shuffle_blocks=False), 0),
                                  batch_size=1, k=2, rng=random.Random(0), stats=stats))
    assert stats.images == 1 and stats.skipped_images == 2 and len(batches) == 1
    assert "missing image" in stats.first_error or "escapes" in stats.first_error

    # Predictions as annotate writes them: a perfect mask for every usable expression, an error row per flagged one.
    preds = []
    for r in rows:
        for e in r["expressions"]:
            ok = not r["error"]
            preds.append({"expression_id": e["expression_id"], "image_id": r["image_id"], "dataset": r["dataset"],
                          "split": r["split"], "rejected": bool(e["no_target"]) if ok else None,
                          "mask": e["gt_mask"] if ok else None, "status": STATUS_OK if ok else STATUS_ERROR,
                          "error": None if ok else r["error"]})
    (tmp_path / "pred").mkdir()
    pq.write_table(pa.Table.from_pylist(preds), tmp_path / "pred" / "p.parquet")
    out = tmp_path / "report"
    assert score_job.main(["--predictions", str(tmp_path / "pred"), "--ground-truth", str(tasks),
                           "--out", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    n_flagged = sum(len(r["expressions"]) for r in rows if r["error"])
    assert doc["inputs"]["counts"]["error_status"] == n_flagged == doc["overall"]["errors"]
    assert doc["overall"]["count"] == len(preds)


def test_byte_limit_options_are_validated(tmp_path, capsys):
    assert annotate_job.main(["--max-image-bytes", "0", "--input", str(tmp_path)]) == annotate_job.EXIT_REFUSED
    assert "image limits must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare_main(["--format", "manifest", "--root", "m.jsonl", "--out", str(tmp_path), "--max-image-bytes", "0"])
