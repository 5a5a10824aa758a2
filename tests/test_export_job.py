"""`python -m jobs.export` on a small real run: Shapes-GRES (the project's generator, gRefCOCO-format raw files)
-> annotate (shipped model) -> COCO results that pycocotools loads against the generator's own instances.json,
and pseudo-label task shards that jobs.train trains on and jobs.score scores to exactly the source predictions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO

import jobs.annotate as annotate_job
import jobs.export as export_job
import jobs.prepare as prepare_job
import jobs.score as score_job
import jobs.train as train_job
from pipeline import masks, storage
from pipeline.schemas import STATUS_ERROR, TASK_SCHEMA
from tests.test_annotate_job import SMALL
from tests.test_gsva_predict import SHIPPED
from tests.test_train_job import job_summary


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory) -> dict[str, Path]:
    """12 Shapes-GRES images in task shards of 4 (raw files in tasks/raw), annotated by the shipped model."""
    root = tmp_path_factory.mktemp("export")
    tasks, annotated = root / "tasks", root / "annotate"
    assert prepare_job.main(["--format", "shapes", "--num-images", "12", "--rows-per-file", "4", "--out",
                             str(tasks)]) == 0
    assert annotate_job.main(["--input", str(tasks), "--output", str(annotated), "--checkpoint", str(SHIPPED),
                              *SMALL]) == 0
    return {"root": root, "tasks": tasks, "annotate": annotated}


def predictions(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("*.parquet"))])


def test_coco_results_load_with_pycocotools_and_round_trip(run, capsys):
    out = run["root"] / "coco"
    assert export_job.main(["--predictions", str(run["annotate"]), "--to", "coco", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    preds = predictions(run["annotate"] / "predictions").to_pylist()
    summary = json.loads((out / "_export.json").read_text())
    rejected = sum(1 for p in preds if p["rejected"])
    assert summary["rows"] == {"exported": len(preds) - rejected, "rejected": rejected}  # no errors in this run
    files = len(list((run["annotate"] / "predictions").glob("*.parquet")))
    assert f"{len(preds)} prediction rows from {files} file(s)" in printed
    results = [r for f in sorted((out / "results").glob("*.json")) for r in json.loads(f.read_text())]
    assert len(results) == len(preds) - rejected and len(list((out / "results").glob("*.json"))) == files
    gt = COCO(str(run["tasks"] / "raw" / "instances.json"))  # the source's own instances.json
    res = gt.loadRes(results)
    assert len(res.getAnnIds()) == len(results)
    by_id = {p["expression_id"]: p for p in preds}
    for r, ann in zip(results, res.loadAnns(res.getAnnIds())):
        assert isinstance(r["image_id"], int) and r["image_id"] in gt.imgs  # integer ids, as the source has them
        source = by_id[r["expression_id"]]
        assert r["segmentation"] == source["mask"] and r["text"] == source["text"]  # the RLE round-trips
        assert r["score"] == pytest.approx(source["score"]) and str(r["image_id"]) == source["image_id"]
        assert ann["area"] == masks.area(source["mask"])
        assert (res.annToMask(ann).astype(bool) == masks.decode(source["mask"])).all()
    images = [i for f in sorted((out / "images").glob("*.json")) for i in json.loads(f.read_text())]
    assert sorted(i["id"] for i in images) == sorted(gt.imgs)
    for image in images:
        assert (image["width"], image["height"], image["file_name"]) == \
            (gt.imgs[image["id"]]["width"], gt.imgs[image["id"]]["height"], gt.imgs[image["id"]]["file_name"])


def test_tasks_export_trains_and_scores_to_the_source_predictions(run, capsys):
    out = run["root"] / "pseudo"
    assert export_job.main(["--predictions", str(run["annotate"]), "--to", "tasks", "--out", str(out)]) == 0
    capsys.readouterr()
    shards = sorted(out.glob("*.parquet"))
    assert [s.name for s in shards] == [s.name for s in sorted(run["tasks"].glob("*.parquet"))]
    table = pa.concat_tables([pq.read_table(s) for s in shards])
    assert table.schema.equals(TASK_SCHEMA)
    preds = {p["expression_id"]: p for p in predictions(run["annotate"] / "predictions").to_pylist()}
    exprs = [e for row in table.to_pylist() for e in row["expressions"]]
    assert len(exprs) == len(preds)
    for e in exprs:
        source = preds[e["expression_id"]]
        assert e["no_target"] == source["rejected"] and e["gt_mask"] == source["mask"]

    report = run["root"] / "report"
    assert score_job.main(["--predictions", str(run["annotate"] / "predictions"), "--ground-truth", str(out),
                           "--out", str(report)]) == 0
    overall = json.loads((report / "metrics.json").read_text())["overall"]
    assert overall["count"] == len(preds) and overall["errors"] == 0
    assert overall["giou"] == 1.0 and overall["ciou"] == 1.0
    assert overall["n_acc"] in (1.0, None) and overall["t_acc"] in (1.0, None)

    assert train_job.main(["--data", str(out), "--output", str(run["root"] / "train"), "--preset", "tiny",
                           "--max-steps", "2", "--batch-size", "2", "--checkpoint-every", "2",
                           "--shuffle-buffer", "4", "--workers", "1"]) == 0
    final = job_summary(capsys.readouterr().out)["final"]
    assert final["step"] == 2 and final["loss"] > 0  # the pseudo-labels train


def test_min_score_and_error_rows(run, capsys):
    """A predictions folder (no annotate markers) with one error row, and a score cut: neither is exported."""
    folder = run["root"] / "edited"
    shutil.copytree(run["annotate"] / "predictions", folder)
    first = sorted(folder.glob("*.parquet"))[0]
    table = pq.read_table(first)
    status = pc.if_else(pa.array([i == 0 for i in range(table.num_rows)]), STATUS_ERROR, table["status"])
    pq.write_table(table.set_column(table.schema.get_field_index("status"), "status", status), first)
    scores = sorted(predictions(folder)["score"].to_pylist())
    cut = scores[len(scores) // 2]
    out = run["root"] / "cut"
    assert export_job.main(["--predictions", str(folder), "--tasks", str(run["tasks"]), "--to", "tasks",
                            "--min-score", str(cut), "--out", str(out)]) == 0
    rows = json.loads((out / "_export.json").read_text())["rows"]
    below = sum(1 for s in scores if s < cut)
    assert rows["error"] == 1 and rows["below_min_score"] in (below, below - 1) and rows["exported"] > 0
    assert sum(rows.values()) == len(scores)
    kept = [e for s in sorted(out.glob("*.parquet")) for r in pq.read_table(s).to_pylist() for e in r["expressions"]]
    assert len(kept) == rows["exported"]
    assert table["expression_id"][0].as_py() not in {e["expression_id"] for e in kept}
    assert "rows:" in capsys.readouterr().out
    assert export_job.main(["--predictions", str(folder), "--to", "tasks", "--out", str(out)]) == 2
    assert "pass --tasks" in capsys.readouterr().err


def test_coco_export_to_s3(run, s3, capsys):
    """Same job, output on a real S3 server: results and images lists land there, readable with pycocotools."""
    out = f"s3://{s3.bucket}/export-test/coco"
    assert export_job.main(["--predictions", str(run["annotate"]), "--to", "coco", "--out", out]) == 0
    capsys.readouterr()
    fs, _ = storage.filesystem(out, s3.options)
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{s3.bucket}/export-test/coco"))
    keys = sorted(p.stem for p in (run["annotate"] / "predictions").glob("*.parquet"))
    assert names == sorted([*(f"{k}.json" for k in keys), *(f"{k}.json" for k in keys), "_export.json"])
    results = [r for k in keys for r in json.loads(fs.cat_file(f"{s3.bucket}/export-test/coco/results/{k}.json"))]
    gt = COCO(str(run["tasks"] / "raw" / "instances.json"))
    assert len(gt.loadRes(results).getAnnIds()) == json.loads(fs.cat_file(
        f"{s3.bucket}/export-test/coco/_export.json"))["rows"]["exported"]
