"""The score job end to end on real local Ray: local files, the loopback S3 server, the report, compare mode.

The numbers are checked against the straightforward dense evaluator (tests/metrics_reference.py).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import score as score_job
from pipeline import storage
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
    assert "lack column(s) ['rejected', 'mask', 'status']" in capsys.readouterr().err
    code = score_job.main(["--predictions", str(tmp_path / "nowhere"), "--ground-truth", str(root / "gt"),
                           "--out", str(tmp_path / "out")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
