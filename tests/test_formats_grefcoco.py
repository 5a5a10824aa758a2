"""gRefCOCO reader against small files in the real format: multi-target, crowd RLE, no-target, bad items."""

import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline import masks
from pipeline.prepare.formats import grefcoco
from pipeline.prepare.formats.items import SkipReport, SourceError, resolve_within
from pipeline.schemas import TASK_SCHEMA
from tests import coco_samples as cs


@pytest.fixture
def rows_and_skips(tmp_path):
    root = cs.write_grefcoco(tmp_path / "grefcoco")
    skips = SkipReport()
    rows = grefcoco.read_task_rows(str(root), skips=skips)
    return root, {r["image_id"]: r for r in rows}, skips


def _exprs(row):
    return {e["expression_id"]: e for e in row["expressions"]}


def test_rows_group_expressions_by_image_and_fit_the_schema(rows_and_skips):
    root, rows, _ = rows_and_skips
    assert sorted(rows) == ["1", "2", "3", "5"]
    escaping = rows["3"]  # flagged, not dropped: its expression becomes an error row in annotate
    assert escaping["image_uri"] is None and "escapes the dataset root" in escaping["error"]
    assert [e["text"] for e in escaping["expressions"]] == ["escape"] and rows["1"]["error"] is None
    assert [e["expression_id"] for e in rows["1"]["expressions"]] == ["1", "2", "3", "4"]
    assert sorted(_exprs(rows["2"])) == ["5", "7"]
    assert rows["1"]["split"] == "val" and rows["2"]["split"] == "testA"
    assert (rows["1"]["width"], rows["1"]["height"]) == (cs.W1, cs.H1)
    assert rows["1"]["image_uri"] == str(root / "images" / "img1.png") and rows["1"]["image"] is None
    assert rows["1"]["dataset"] == "grefcoco"
    table = pa.Table.from_pylist(list(rows.values()), schema=TASK_SCHEMA)
    assert table.num_rows == 4


def test_multi_target_union_includes_crowd_rle(rows_and_skips):
    _, rows, _ = rows_and_skips
    exprs = _exprs(rows["1"])
    square = masks.decode(masks.from_polygons([cs.SQUARE_101], cs.H1, cs.W1))
    assert square.sum() > 0 and not (square & cs.crowd_mask()).any()
    for sent_id in ("1", "2"):  # every sentence of a ref is its own expression, same GT
        e = exprs[sent_id]
        assert e["no_target"] is False
        assert (masks.decode(e["gt_mask"]) == (square | cs.crowd_mask())).all()
        assert e["gt_boxes"] == [[1.0, 1.0, 5.0, 4.0], [2.0, 6.0, 8.0, 3.0]]
    assert exprs["1"]["text"] == "the square and the bar"


def test_compressed_rle_single_target_and_box_from_mask(rows_and_skips):
    _, rows, _ = rows_and_skips
    e = _exprs(rows["1"])["3"]
    assert (masks.decode(e["gt_mask"]) == cs.rle_mask()).all()
    assert e["gt_boxes"] == [[8.0, 0.0, 4.0, 3.0]]  # no bbox in the annotation: computed from the mask


def test_no_target_both_spellings_get_empty_masks(rows_and_skips):
    _, rows, _ = rows_and_skips
    for row, sent_id in ((rows["1"], "4"), (rows["2"], "7")):
        e = _exprs(row)[sent_id]
        assert e["no_target"] is True and e["gt_boxes"] == []
        assert e["gt_mask"]["size"] == [row["height"], row["width"]] and masks.area(e["gt_mask"]) == 0
    tri = _exprs(rows["2"])["5"]
    assert tri["no_target"] is False and masks.area(tri["gt_mask"]) > 0


def test_bad_items_are_skipped_named_and_counted(rows_and_skips):
    _, _, skips = rows_and_skips
    summary = skips.to_dict()
    assert {r: (v["items"], v["expressions"]) for r, v in summary.items()} == cs.EXPECTED_SKIPS
    assert "annotation 202" in summary["corrupt annotation"]["examples"][0]
    assert "ref 8" in summary["unknown annotation"]["examples"][0]
    assert "sentence 6 of ref 4" in summary["empty sentence"]["examples"][0]


def test_split_filter(tmp_path):
    root = cs.write_grefcoco(tmp_path / "g")
    rows = grefcoco.read_task_rows(str(root), splits=frozenset({"val"}))
    assert [r["image_id"] for r in rows] == ["1"]


def test_mixed_no_target_and_corrupt_files_are_refused(tmp_path):
    skips = SkipReport()
    refs = [{"ref_id": 1, "image_id": 1, "ann_id": [-1, 101], "split": "val", "sentences": []}]
    assert grefcoco.load_items(refs, cs.instances(), images_root=str(tmp_path), skips=skips) == []
    assert skips.items["corrupt ref"] == 1
    with pytest.raises(SourceError, match="JSON list"):
        grefcoco.load_items({"refs": []}, cs.instances(), images_root=str(tmp_path))
    (tmp_path / "grefs(unc).json").write_text("{not json")
    (tmp_path / "instances.json").write_text(json.dumps(cs.instances()))
    with pytest.raises(ValueError, match="not valid JSON"):
        grefcoco.read_items(str(tmp_path))


@pytest.mark.parametrize("bad", ["../x.png", "a/../../x.png", "/etc/passwd", "s3://other/x.png", ""])
def test_paths_escaping_the_root_are_refused(bad):
    with pytest.raises(ValueError):
        resolve_within("/data/images", bad)


def test_paths_inside_the_root_resolve():
    assert resolve_within("s3://b/images", "sub/../a.png") == "s3://b/images/a.png"
    assert resolve_within("/data/images", "COCO_1.jpg") == "/data/images/COCO_1.jpg"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", ["wrong size", "garbage counts"])
def test_an_annotation_that_cannot_be_rasterised_fails_only_its_expression(bad):
    from pipeline.prepare.formats.items import to_task_row

    wrong_size = masks.encode(np.ones((5, 5), bool))  # reaches a worker only if indexing was bypassed
    if bad == "garbage counts":  # a run cut off: pycocotools would read past the string
        wrong_size = {"size": [4, 4], "counts": "PPP"}
    item = {"image_id": "1", "image_uri": "x.png", "width": 4, "height": 4, "split": "val", "dataset": "d",
            "annotations": {"1": {"segmentation": wrong_size, "bbox": None},
                            "2": {"segmentation": [[0, 0, 3, 0, 3, 3]], "bbox": None}},
            "expressions": [{"expression_id": "a", "text": "x", "no_target": False, "ann_ids": [1]},
                            {"expression_id": "b", "text": "y", "no_target": False, "ann_ids": [2]}]}
    skips = SkipReport()
    row = to_task_row(item, None, skips)
    assert [e["expression_id"] for e in row["expressions"]] == ["b"]
    assert skips.items["corrupt annotation"] == 1 and "expression a" in skips.examples["corrupt annotation"][0]
    assert masks.decode(row["expressions"][0]["gt_mask"]).any()
