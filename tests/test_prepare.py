"""Prepare end to end on a real local Ray cluster: gRefCOCO with bad items, manifests, Shapes-GRES, reruns."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.prepare import main
from pipeline import masks
from pipeline.images import decode_image
from pipeline.prepare.formats import grefcoco
from pipeline.schemas import TASK_SCHEMA
from pipeline.tasks import SUMMARY_FILE, explode_expressions, list_shards, read_tasks
from tests import coco_samples as cs


def _rows(out):
    """Shard rows read back with plain pyarrow (read_tasks, the Ray reader, is exercised by the shapes test)."""
    rows = [r for f in list_shards(str(out)) for r in pq.read_table(f).to_pylist()]
    return sorted(rows, key=lambda r: (r["split"], r["image_id"]))


def test_grefcoco_embedded_with_bad_items_and_rerun(ray_local, tmp_path, capsys):
    root = cs.write_grefcoco(tmp_path / "grefcoco")
    out = tmp_path / "tasks"
    argv = ["--format", "grefcoco", "--root", str(root), "--out", str(out), "--embed-images"]
    assert main([*argv, "--rows-per-file", "1"]) == 0
    printed = capsys.readouterr().out
    # The missing image (5) and the one escaping the root (3) are flagged: kept, with reasons, without bytes.
    assert "4 images, 8 expressions" in printed and "flagged 2 item(s)" in printed
    assert "missing image: 1 item(s), 1 expression(s)" in printed
    names = [p.rsplit("/", 1)[1] for p in list_shards(str(out))]
    assert names == ["testA-00000.parquet", "testA-00001.parquet", "testA-00002.parquet", "val-00000.parquet"]
    assert pq.read_schema(out / "val-00000.parquet").equals(TASK_SCHEMA, check_metadata=False)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert {r: (v["items"], v["expressions"]) for r, v in summary["skipped"].items()} == cs.EXPECTED_SKIPS
    assert {r: (v["items"], v["expressions"]) for r, v in summary["flagged"].items()} == {
        "missing image": (1, 1), "image path escapes root": (1, 1)}
    assert "missing.png" in summary["flagged"]["missing image"]["examples"][0]
    assert summary["per_split"]["testA"]["flagged_rows"] == 2

    rows = _rows(out)
    flagged = {r["image_id"]: r for r in rows if r["error"] is not None}
    assert sorted(flagged) == ["3", "5"] and all(r["image"] is None for r in flagged.values())
    assert "missing image" in flagged["5"]["error"] and "escapes the dataset root" in flagged["3"]["error"]
    rows = [r for r in rows if r["error"] is None]
    serial = {r["image_id"]: r for r in grefcoco.read_task_rows(str(root))}
    assert [(r["split"], r["image_id"]) for r in rows] == [("testA", "2"), ("val", "1")]
    for row in rows:
        assert row["image"] == (root / "images" / f"img{row['image_id']}.png").read_bytes()
        assert decode_image(row["image"]).shape == (row["height"], row["width"], 3)
        want = serial[row["image_id"]]["expressions"]
        assert [e["expression_id"] for e in row["expressions"]] == [e["expression_id"] for e in want]
        for got, exp in zip(row["expressions"], want):
            assert (masks.decode(got["gt_mask"]) == masks.decode(exp["gt_mask"])).all()
            assert got["no_target"] == exp["no_target"]

    # A rerun with bigger shards overwrites: the stale second testA shard goes, no row is duplicated.
    assert main([*argv, "--rows-per-file", "100"]) == 0
    assert [p.rsplit("/", 1)[1] for p in list_shards(str(out))] == ["testA-00000.parquet", "val-00000.parquet"]
    assert len(_rows(out)) == 4


def test_manifest_referenced_and_embedded(ray_local, tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((9, 14, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    records = [{"image": "imgs/a.png", "expression": "the void"}, {"image": "imgs/a.png", "expression": "x"},
               {"image": "imgs/broken.png", "expression": "y"}, {"image": "imgs/gone.png", "expression": "z"}]
    manifest = tmp_path / "mine.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in records))

    assert main(["--format", "manifest", "--root", str(manifest), "--out", str(tmp_path / "ref")]) == 0
    ref = _rows(tmp_path / "ref")
    # Not opened: broken kept as is; the missing one is flagged (checked with a stat, never read).
    assert [(r["image_id"], r["error"] is None) for r in ref] == [
        ("imgs/a.png", True), ("imgs/broken.png", True), ("imgs/gone.png", False)]
    assert ref[0]["width"] is None and ref[0]["image"] is None and ref[0]["dataset"] == "mine"

    assert main(["--format", "manifest", "--root", str(manifest), "--out", str(tmp_path / "emb"),
                 "--embed-images"]) == 0
    emb = _rows(tmp_path / "emb")
    assert [(r["image_id"], r["width"], r["height"], r["image"] is None) for r in emb] == [
        ("imgs/a.png", 14, 9, False), ("imgs/broken.png", None, None, True), ("imgs/gone.png", None, None, True)]
    summary = json.loads((tmp_path / "emb" / SUMMARY_FILE).read_text())
    assert summary["skipped"] == {} and set(summary["flagged"]) == {"not an image", "missing image"}
    assert "not an image" in emb[1]["error"] and "missing image" in emb[2]["error"]
    # The byte cap (checked with a stat, before reading) flags a.png in both modes, the 9-byte file passes.
    cap = str((tmp_path / "imgs" / "a.png").stat().st_size - 1)
    for mode, code in (([], 0), (["--embed-images"], 1)):  # embedded: no usable image left -> exit 1
        out = tmp_path / f"cap{len(mode)}"
        assert main(["--format", "manifest", "--root", str(manifest), "--out", str(out), "--max-image-bytes", cap,
                     *mode]) == code
        capped = {r["image_id"]: r["error"] for r in _rows(out)}
        assert "exceeds the limit" in capped["imgs/a.png"], mode
    exploded = explode_expressions(emb[0])
    assert [e["text"] for e in exploded] == ["the void", "x"]
    assert all(e["image_id"] == "imgs/a.png" and e["width"] == 14 and e["gt_mask"] is None for e in exploded)


def test_shapes_job_and_expression_rows(ray_local, tmp_path):
    out = tmp_path / "shapes"
    assert main(["--format", "shapes", "--num-images", "20", "--seed", "3", "--out", str(out),
                 "--rows-per-file", "8"]) == 0
    assert (out / "raw" / "grefs(unc).json").exists() and (out / "raw" / "images" / "shapes_000020.png").exists()
    per_expression = read_tasks(str(out)).flat_map(explode_expressions).select_columns(
        ["image_id", "expression_id", "split"]).take_all()
    assert len(per_expression) == 80 and len({r["image_id"] for r in per_expression}) == 20
    assert len({r["expression_id"] for r in per_expression}) == 80
    assert {r["split"] for r in per_expression} == {"train", "val", "test"}
    val = read_tasks(str(out), splits={"val"}, columns=["image_id", "split"]).take_all()
    assert len(val) == 2 and all(set(r) == {"image_id", "split"} and r["split"] == "val" for r in val)
    with pytest.raises(ValueError, match="no task shards of split"):
        read_tasks(str(out), splits={"testA"})
    # A file named like a shard but without the task columns fails the read with a clear message.
    pq.write_table(pa.table({"image_id": ["x"]}), out / "bad-00000.parquet")
    with pytest.raises(Exception, match=r"bad-00000.parquet lacks the column\(s\)"):
        read_tasks(str(out), splits={"bad"}).take_all()


def test_invalid_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--format", "shapes", "--out", str(tmp_path)])
    assert "--num-images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--format", "grefcoco", "--out", str(tmp_path), "--root", "x", "--rows-per-file", "0"])
    with pytest.raises(SystemExit):
        main(["--format", "refcoco+", "--out", str(tmp_path), "--root", "x", "--split-by", "umd"])
    with pytest.raises(SystemExit):
        main(["--format", "grefcoco", "--out", str(tmp_path), "--root", "x", "--seed", "1"])
    assert "apply only to --format shapes" in capsys.readouterr().err
    assert main(["--format", "grefcoco", "--root", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shard_plan_and_names(tmp_path):
    from pipeline.prepare.graph import PrepareConfig, plan_shards
    from pipeline.tasks import parse_shard_name, shard_name

    assert shard_name("testA", 3) == "testA-00003.parquet" and shard_name("a/b", 0) == "a_b-00000.parquet"
    assert parse_shard_name("s3://b/x/val-00012.parquet") == ("val", 12)
    assert parse_shard_name("val-00012.parquet.tmp") is None and parse_shard_name(SUMMARY_FILE) is None
    items = [{"split": s, "image_id": str(i)} for i, s in enumerate(["val"] * 5 + ["train"] * 2)]
    plan = plan_shards(items, PrepareConfig(out=str(tmp_path), rows_per_file=2))
    assert [(p["split"], p["index"], len(json.loads(p["items"]))) for p in plan] == [
        ("train", 0, 2), ("val", 0, 2), ("val", 1, 2), ("val", 2, 1)]
    assert plan[3]["uri"] == str(tmp_path / "val-00002.parquet")
