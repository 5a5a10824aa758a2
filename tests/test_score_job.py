"""The score job end to end on real local Ray: local files, the loopback S3 server, the report, compare mode.

The numbers are checked against the straightforward dense evaluator (tests/metrics_reference.py).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import score as score_job
from pipeline import masks, storage
from pipeline.schemas import PREDICTION_SCHEMA, TASK_SCHEMA
from pipeline.score.metrics import METRIC_KEYS
from tests.metrics_reference import reference_score
from tests.test_metrics import assert_same, exploded, synthetic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPORT_FILES = ("metrics.json", "metrics.md", "splits.png", "iou_hist.png", "confusion.png", "gallery.png")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two datasets' task shards (with PNG bytes) and predictions, two files each side."""
    root = tmp_path_factory.mktemp("score")
    tasks_a, preds_a = synthetic(12, seed=11, dataset="grefcoco", image_bytes=True)
    tasks_b, preds_b = synthetic(6, seed=12, dataset="shapes", image_bytes=True)
    (root / "gt").mkdir()
    (root / "pred").mkdir()
    for name, tasks, preds in (("a", tasks_a, preds_a), ("b", tasks_b, preds_b)):
        pq.write_table(pa.Table.from_pylist(tasks, schema=TASK_SCHEMA), root / "gt" / f"{name}.parquet")
        pq.write_table(pa.Table.from_pylist(preds, schema=PREDICTION_SCHEMA), root / "pred" / f"{name}.parquet")
    return root, tasks_a + tasks_b, preds_a + preds_b


def _check_report(doc: dict, tasks, preds, protocol: str, by: tuple[str, ...]) -> None:
    assert set(doc) == {"protocol", "inputs", "model", "overall", "splits"}
    assert doc["protocol"] == protocol and doc["model"] == "tiny-test"
    ref = reference_score(exploded(tasks), preds, protocol, by=by)
    assert_same(doc["overall"], ref["overall"])
    assert set(doc["splits"]) == set(ref) - {"overall"}
    for name, m in doc["splits"].items():
        assert list(m) == list(METRIC_KEYS)
        assert_same(m, ref[name])
    counts = doc["inputs"]["counts"]
    assert counts["without_ground_truth"] == 2 and counts["duplicates"] == 2


@pytest.mark.slow
def test_job_local_files_then_s3_with_baseline(ray_local, s3, shards, tmp_path, capsys):
    """Run 1: local files, ReLA protocol, grouped by split and dataset. Run 2: the same data from the
    loopback S3 server into S3, GSVA protocol, grouped by dataset, compared with run 1's metrics.json."""
    root, tasks, preds = shards
    out1 = tmp_path / "rela"
    assert score_job.main(["--predictions", str(root / "pred"), "--ground-truth", str(root / "gt"),
                           "--out", str(out1), "--by", "split,dataset"]) == 0
    doc = json.loads((out1 / "metrics.json").read_text())
    _check_report(doc, tasks, preds, "rela", ("split", "dataset"))
    assert "val/grefcoco" in doc["splits"]
    for name in REPORT_FILES[2:]:
        assert (out1 / name).read_bytes().startswith(PNG_MAGIC), name
    md = (out1 / "metrics.md").read_text()
    giou = f"{100 * doc['overall']['giou']:.2f}"
    assert f"| **overall** | {doc['overall']['count']} | {doc['overall']['errors']} | {giou} |" in md

    fs, _ = storage.filesystem(f"s3://{s3.bucket}/", s3.options)
    base = f"{s3.bucket}/score-job"
    for side in ("gt", "pred"):
        for f in (root / side).iterdir():
            fs.put_file(str(f), f"{base}/{side}/{f.name}")
    capsys.readouterr()
    assert score_job.main(["--predictions", f"s3://{base}/pred", "--ground-truth", f"s3://{base}/gt",
                           "--out", f"s3://{base}/report", "--s3-endpoint", s3.endpoint, "--protocol", "gsva",
                           "--by", "dataset", "--baseline", str(out1 / "metrics.json")]) == 0
    printed = capsys.readouterr().out
    doc2 = json.loads(fs.cat_file(f"{base}/report/metrics.json"))
    _check_report(doc2, tasks, preds, "gsva", ("dataset",))
    for name in REPORT_FILES[2:]:
        assert fs.cat_file(f"{base}/report/{name}").startswith(PNG_MAGIC), name
    assert "protocols differ" in printed
    delta = 100 * (doc2["overall"]["giou"] - doc["overall"]["giou"])
    assert f"| overall | gIoU | {giou} | {100 * doc2['overall']['giou']:.2f} | {delta:+.2f} |" in printed
    assert "Compared with the baseline" in fs.cat_file(f"{base}/report/metrics.md").decode()


def test_job_refuses_bad_inputs(shards, tmp_path, capsys):
    root, _, _ = shards
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"expression_id": ["x"], "dataset": ["d"]}), bad)
    code = score_job.main(["--predictions", str(bad), "--ground-truth", str(root / "gt"),
                           "--out", str(tmp_path / "out")])
    assert code == 2
    assert "bad.parquet lacks the column(s) ['rejected', 'mask']" in capsys.readouterr().err
    code = score_job.main(["--predictions", str(tmp_path / "nowhere"), "--ground-truth", str(root / "gt"),
                           "--out", str(tmp_path / "out")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def _one_line(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("score:")]


def test_every_predictions_file_is_checked(shards, tmp_path, capsys):
    """Defect 5: a bad second file (no mask / mask as string) is refused up front with exit 2 and one line."""
    root, _, _ = shards
    good = pq.read_table(root / "pred" / "a.parquet")
    for name, bad in (("no-mask", good.drop_columns(["mask"])),
                      ("string-mask", good.set_column(good.schema.get_field_index("mask"), "mask",
                                                      pa.array(["x"] * good.num_rows)))):
        folder = tmp_path / name
        folder.mkdir()
        pq.write_table(good, folder / "a.parquet")
        pq.write_table(bad, folder / "b.parquet")
        code = score_job.main(["--predictions", str(folder), "--ground-truth", str(root / "gt"),
                               "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        (line,) = _one_line(err)
        assert "b.parquet" in line and "mask" in line, line
        assert ("string" in line) == (name == "string-mask"), line


#: Unusable masks for a ground truth of h x w: counts that do not add up to h*w, a negative size, another size,
#: and a garbage counts string (truncated mid-number, bytes outside the alphabet: pycocotools reads past its end).
UNUSABLE = (lambda h, w: {"size": [h, w], "counts": "0"},
            lambda h, w: {"size": [-h, w], "counts": masks.empty(h, w)["counts"]},
            lambda h, w: {"size": [h + 1, w], "counts": masks.empty(h + 1, w)["counts"]},
            lambda h, w: {"size": [h, w], "counts": "PPP\x7f~"})


def _unusable_predictions(preds: list[dict], n: int = 8) -> tuple[list[dict], set[str]]:
    """Copies of `preds` where the first `n` ok, kept masks are replaced by unusable ones; the replaced ids."""
    out, changed = [], set()
    for p in preds:
        if len(changed) < n and p["status"] == "ok" and not p["rejected"] and p["expression_id"] not in changed:
            p = dict(p, mask=UNUSABLE[len(changed) % len(UNUSABLE)](*p["mask"]["size"]))
            changed.add(p["expression_id"])
        out.append(p)
    return out, changed


@pytest.mark.timeout(300)
def test_unusable_masks_are_counted_not_crashing(ray_local, shards, tmp_path, capsys):
    """Defect 5: wrong-size, negative-size, garbage and short-sum RLEs score as failed predictions, counted in
    metrics.json and the summary line; the report (gallery included) is written; nothing hangs."""
    root, tasks, preds = shards
    bad, changed = _unusable_predictions(preds)
    assert len(changed) == 8
    (tmp_path / "pred").mkdir()
    pq.write_table(pa.Table.from_pylist(bad, schema=PREDICTION_SCHEMA), tmp_path / "pred" / "p.parquet")
    out = tmp_path / "out"
    assert score_job.main(["--predictions", str(tmp_path / "pred"), "--ground-truth", str(root / "gt"),
                           "--out", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["inputs"]["counts"]["bad_masks"] == 8
    as_failed = [dict(p, mask=None) if p["expression_id"] in changed and p["status"] == "ok" else p for p in bad]
    assert_same(doc["overall"], reference_score(exploded(tasks), as_failed, "rela")["overall"])
    assert "8 unusable masks" in capsys.readouterr().out
    for name in REPORT_FILES[2:]:
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name


def test_minimal_predictions_from_another_system(ray_local, shards, tmp_path):
    """Defect 6: only expression_id, rejected, mask (+ status, error, image_id); groups come from the ground truth."""
    root, tasks, preds = shards
    one = [t for t in tasks if t["dataset"] == "grefcoco"]
    keep = [p for p in preds if p["dataset"] == "grefcoco"]
    (tmp_path / "gt").mkdir()
    pq.write_table(pa.Table.from_pylist(one, schema=TASK_SCHEMA), tmp_path / "gt" / "g.parquet")
    ref = reference_score(exploded(one), keep, "rela", by=("split",))
    for columns in (["expression_id", "rejected", "mask"],
                    ["expression_id", "rejected", "mask", "status", "error", "image_id"]):
        folder = tmp_path / "-".join(columns[3:]) if len(columns) > 3 else tmp_path / "minimal"
        folder.mkdir()
        table = pa.Table.from_pylist(keep, schema=PREDICTION_SCHEMA).select(columns)
        if columns == ["expression_id", "rejected", "mask"]:  # no status column: an error row has no mask
            table = table.filter(pa.compute.is_valid(table.column("mask")))
            ref_rows = [p for p in keep if p["mask"] is not None]
            want = reference_score(exploded(one), ref_rows, "rela", by=("split",))
        else:
            want = ref
        pq.write_table(table, folder / "p.parquet")
        out = tmp_path / f"out-{folder.name}"
        assert score_job.main(["--predictions", str(folder), "--ground-truth", str(tmp_path / "gt"),
                               "--out", str(out), "--by", "split,dataset"]) == 0, columns
        doc = json.loads((out / "metrics.json").read_text())
        assert_same(doc["overall"], want["overall"])
        assert set(doc["splits"]) == {f"{s}/grefcoco" for s in ("val", "testA", "testB")}
        for split in ("val", "testA", "testB"):
            assert_same(doc["splits"][f"{split}/grefcoco"], want[split])
