"""Manifest reader: JSONL / CSV / Parquet, grouping by image, ids, path rules, no ground truth."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.prepare.formats import manifest
from pipeline.prepare.formats.items import SkipReport, SourceError
from pipeline.schemas import TASK_SCHEMA

RECORDS = [
    {"image": "photos/a.jpg", "expression": "the red car", "id": "e1"},
    {"image": "s3://bucket/b.jpg", "expression": "all people", "id": "e2"},
    {"image": "photos/a.jpg", "expression": "the tree", "id": "e3"},
    {"image": "photos/a.jpg", "expression": "  ", "id": "e4"},
    {"image": "../outside.jpg", "expression": "nope", "id": "e5"},
    {"image": None, "expression": "no image", "id": "e6"},
    {"image": "photos/c.jpg", "expression": "dup", "id": "e1"},
]


def _write(path, records):
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    elif path.suffix == ".csv":
        pa.csv.write_csv(pa.Table.from_pylist(records), path)
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".parquet"])
def test_manifest_formats(tmp_path, ext):
    import pyarrow.csv  # noqa: F401 - registers pa.csv for _write

    path = _write(tmp_path / f"my-images{ext}", RECORDS)
    skips = SkipReport()
    rows = manifest.read_task_rows(str(path), skips=skips)
    by_image = {r["image_id"]: r for r in rows}
    assert list(by_image) == ["photos/a.jpg", "s3://bucket/b.jpg", "../outside.jpg", None]
    a = by_image["photos/a.jpg"]
    assert a["image_uri"] == str(tmp_path / "photos" / "a.jpg") and a["error"] is None
    assert by_image["s3://bucket/b.jpg"]["image_uri"] == "s3://bucket/b.jpg"
    assert [(e["expression_id"], e["text"], e["error"] is None) for e in a["expressions"]] == [
        ("e1", "the red car", True), ("e3", "the tree", True), ("e4", "  ", False)]
    assert "manifest row 3: the expression is empty" in a["expressions"][2]["error"]
    # Flagged, not dropped: a path leaving the folder and a row without image are rows with their reason.
    outside, no_image = by_image["../outside.jpg"], by_image[None]
    assert outside["image_uri"] is None and "escapes the dataset root" in outside["error"]
    assert no_image["image_uri"] is None and "manifest row 5: no image reference" in no_image["error"]
    assert [e["expression_id"] for e in outside["expressions"] + no_image["expressions"]] == ["e5", "e6"]
    assert all(e["no_target"] is None and e["gt_mask"] is None and e["gt_boxes"] is None
               for r in rows for e in r["expressions"])
    assert a["width"] is None and a["height"] is None and a["split"] == "all" and a["dataset"] == "my-images"
    assert {k: v["items"] for k, v in skips.to_dict().items()} == {"duplicate expression id": 1}
    assert sum(len(r["expressions"]) for r in rows) == len(RECORDS) - 1  # all but the repeated id
    assert pa.Table.from_pylist(rows, schema=TASK_SCHEMA).num_rows == 4


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_symlinks_are_judged_by_their_real_path(tmp_path, scheme):
    """A link inside the root is fine (its real path is stored); one leading outside it is flagged."""
    (tmp_path / "root" / "imgs").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "root" / "imgs" / "a.png").write_bytes(b"a")
    (tmp_path / "outside" / "x.png").write_bytes(b"x")
    (tmp_path / "root" / "imgs" / "in.png").symlink_to(tmp_path / "root" / "imgs" / "a.png")
    (tmp_path / "root" / "imgs" / "out.png").symlink_to(tmp_path / "outside" / "x.png")
    (tmp_path / "root" / "linked-dir").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "real-root").symlink_to(tmp_path / "root", target_is_directory=True)  # the root may be a link
    records = [{"image": i, "expression": "x", "id": i} for i in
               ("imgs/a.png", "imgs/in.png", "imgs/out.png", "linked-dir/x.png", "imgs/../../outside/x.png")]
    path = _write(tmp_path / "real-root" / "m.jsonl", records)
    rows = {r["image_id"]: r for r in manifest.read_task_rows(f"{scheme}{path}")}
    real_a = f"{scheme}{tmp_path / 'root' / 'imgs' / 'a.png'}"
    assert rows["imgs/a.png"]["image_uri"] == rows["imgs/in.png"]["image_uri"] == real_a
    for image in ("imgs/out.png", "linked-dir/x.png", "imgs/../../outside/x.png"):
        assert rows[image]["image_uri"] is None and "escapes the dataset root" in rows[image]["error"], image


def test_empty_rows_of_one_image_stay_distinct(tmp_path):
    records = [{"image": "/abs/x.png", "expression": ""}, {"image": "/abs/x.png", "expression": "  "},
               {"image": "/abs/x.png", "expression": None}]
    (row,) = manifest.read_task_rows(str(_write(tmp_path / "m.jsonl", records)))
    assert len({e["expression_id"] for e in row["expressions"]}) == 3
    assert all("the expression is empty" in e["error"] for e in row["expressions"])


def test_ids_are_derived_from_content_when_absent(tmp_path):
    records = [{"image": "/abs/x.png", "expression": "a cat"}, {"image": "/abs/x.png", "expression": "a dog"}]
    first = manifest.read_task_rows(str(_write(tmp_path / "m.jsonl", records)))
    again = manifest.read_task_rows(str(_write(tmp_path / "n.jsonl", records[::-1])))
    ids = {e["text"]: e["expression_id"] for e in first[0]["expressions"]}
    assert len(set(ids.values())) == 2
    assert ids == {e["text"]: e["expression_id"] for e in again[0]["expressions"]}
    assert first[0]["image_uri"] == "/abs/x.png"


def test_missing_column_and_unknown_extension(tmp_path):
    with pytest.raises(SourceError, match=r"lacks column\(s\) \['expression'\]"):
        manifest.read_records(str(_write(tmp_path / "m.jsonl", [{"image": "a.png", "text": "x"}])))
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(SourceError, match="unsupported extension"):
        manifest.read_records(str(tmp_path / "m.txt"))
