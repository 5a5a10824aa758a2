"""The annotate pipeline on a real local Ray cluster with the real (tiny) GSVA model: every kind of bad input,
--retry-errors, and the loopback S3 server (teacher-forced). The local end-to-end run, resume and the
fingerprint refusal are in test_annotate_job.py (through the CLI)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.annotate.config import InputLimits
from pipeline.annotate.run import run
from pipeline.schemas import STATUS_ERROR, STATUS_OK, TASK_SCHEMA
from tests.test_annotate_support import (
    assert_one_row_per_expression,
    config,
    png_bytes,
    read_predictions,
    shapes_rows,
    write_shards,
)

IMAGES, PER_FILE = 12, 4


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_rows(tmp_path_factory.mktemp("shapes"), IMAGES)


# -------------------------------------------------------------------------------------------- bad inputs
def bomb_png(width: int, height: int) -> bytes:
    """A valid-header PNG declaring width x height pixels in a few hundred bytes (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = zlib.compress(b"\0" * (width + 1) * 16)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def cmyk_jpeg() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("CMYK", (24, 16), (0, 255, 255, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


def bad_rows(folder: Path) -> tuple[list[dict], dict[str, str | None]]:
    """Task rows covering every bad-input kind, and per image_id the expected error (None: annotated)."""
    rgb = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    (folder / "a-directory.png").mkdir(parents=True, exist_ok=True)
    (folder / "zero.png").write_bytes(b"")
    images = {
        "missing": (None, str(folder / "missing.png"), "missing image"),
        "unreadable": (None, str(folder / "a-directory.png"), "is a directory"),
        "zero-byte-file": (None, str(folder / "zero.png"), "zero-byte"),
        "zero-byte": (b"", None, "zero-byte"),
        "corrupt": (png_bytes(rgb)[:60] + b"\xff" * 40, None, "corrupt"),
        "non-image": (b"%PDF-1.4 not an image at all", None, "not an image"),
        "bomb": (bomb_png(30_000, 30_000), None, "decompression bomb"),
        "one-pixel": (png_bytes(np.zeros((1, 1, 3), np.uint8)), None, "too small"),
        "grayscale": (png_bytes(rgb[:, :, 0]), None, None),
        "rgba": (png_bytes(np.dstack([rgb, rgb[:, :, :1]])), None, None),
        "16-bit": (png_bytes(rgb[:, :, 0].astype(np.uint16) * 257), None, None),
        "cmyk": (cmyk_jpeg(), None, None),
        "huge": (png_bytes(np.zeros((1500, 2000, 3), np.uint8)), None, None),
    }
    rows = []
    for image_id, (data, uri, _) in images.items():
        rows.append({"image_id": image_id, "image": data, "image_uri": uri, "width": None, "height": None,
                     "split": "val", "dataset": "bad", "expressions": [
                         {"expression_id": f"{image_id}-0", "text": "the red circle", "no_target": None},
                         {"expression_id": f"{image_id}-1", "text": "all squares", "no_target": None}]})
    texts = {"empty": "", "blank": "  \t ", "long": "x" * 300, "punctuation": "...", "reserved": "the [SEG] one",
             "null": None, "zero-width": "\u200bthe red\u200d circle", "rtl": "\u202ethe red circle",
             "emoji": "the 🔴 circle", "fullwidth": "ｔｈｅ ｒｅｄ ｃｉｒｃｌｅ", "combining": "the re\u0301d circle",
             "control": "the\x00red circle"}
    rows.append({"image_id": "texts", "image": png_bytes(rgb), "image_uri": None, "width": None, "height": None,
                 "split": "val", "dataset": "bad", "expressions": [
                     {"expression_id": f"text-{name}", "text": text, "no_target": None}
                     for name, text in texts.items()] + [{"expression_id": None, "text": "no id", "no_target": None}]})
    rows.append({"image_id": "no-expressions", "image": png_bytes(rgb), "image_uri": None, "width": None,
                 "height": None, "split": "val", "dataset": "bad", "expressions": []})
    expected = {f"{i}-{k}": e for i, (_, _, e) in images.items() for k in (0, 1)}
    expected.update({f"text-{n}": None for n in ("zero-width", "rtl", "emoji", "fullwidth", "combining", "control")})
    expected.update({"text-empty": "empty", "text-blank": "empty", "text-long": "300 characters",
                     "text-punctuation": "no letters", "text-reserved": "reserved token", "text-null": "missing",
                     None: "no expression_id"})
    return rows, expected


@pytest.fixture(scope="module")
def bad_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    rows, expected = bad_rows(root / "images")
    (root / "tasks").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=TASK_SCHEMA), root / "tasks" / "bad-00000.parquet")
    (root / "tasks" / "broken-00000.parquet").write_bytes(b"PAR1 truncated")  # not a readable shard
    pq.write_table(TASK_SCHEMA.empty_table(), root / "tasks" / "empty-00000.parquet")
    summary = run(config(root / "tasks", root / "out", limits=InputLimits(max_expression_chars=256)))
    return root, rows, expected, summary


def test_bad_inputs_become_error_rows_one_per_expression(bad_run):
    root, rows, expected, summary = bad_run
    table = read_predictions(root / "out")
    assert_one_row_per_expression(table, rows)
    assert summary.rows == table.num_rows == sum(len(r["expressions"]) for r in rows)
    for row in table.to_pylist():
        reason = expected[row["expression_id"]]
        if reason is None:
            assert row["status"] == STATUS_OK and row["error"] is None, row
            assert row["mask"]["size"][0] >= 2
        else:
            assert row["status"] == STATUS_ERROR and reason in row["error"], row
            assert row["mask"] is None
    assert summary.errors == sum(1 for r in table.to_pylist() if r["status"] == STATUS_ERROR)
    assert "retry-errors" in summary.render()
    # an unreadable shard is reported (exit code 1), never silently dropped; an empty shard is simply done
    assert not summary.ok and list(summary.unreadable) == [str(root / "tasks" / "broken-00000.parquet")]
    assert "UNREADABLE INPUT" in summary.render()
    assert pq.read_table(root / "out" / "predictions" / "empty-00000.parquet").num_rows == 0
    assert (root / "out" / "done" / "empty-00000.json").exists()


def test_retry_errors_reruns_only_error_rows(bad_run):
    root, rows, expected, first = bad_run
    before = {r["expression_id"]: r for r in read_predictions(root / "out").to_pylist()}
    rgb = np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    (root / "images" / "missing.png").write_bytes(png_bytes(rgb))  # the missing image has arrived
    summary = run(config(root / "tasks", root / "out", retry_errors=True,
                         limits=InputLimits(max_expression_chars=256)))
    after = {r["expression_id"]: r for r in read_predictions(root / "out").to_pylist()}
    assert len(after) == len(before) and summary.processed == 1 and summary.skipped == 1
    for key in ("missing-0", "missing-1"):
        assert before[key]["status"] == STATUS_ERROR and after[key]["status"] == STATUS_OK
        assert after[key]["mask"]["size"] == [24, 32]
    for key, row in before.items():
        if row["status"] == STATUS_OK:
            assert after[key] == row  # ok rows are not re-run
        elif not (key or "").startswith("missing"):
            assert after[key]["status"] == STATUS_ERROR  # still bad, still one row
    assert summary.total_errors == first.total_errors - 2


# -------------------------------------------------------------------------------------------------- S3
def test_s3_end_to_end_teacher_forced(ray_local, s3, shapes, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(**s3.options.for_protocol("s3"))
    prefix = f"{s3.bucket}/annotate-{tmp_path.name}"
    local = write_shards(shapes[:8], tmp_path / "tasks", PER_FILE)
    for path in local:
        fs.put(str(path), f"{prefix}/tasks/{path.name}")
    summary = run(config(f"s3://{prefix}/tasks", f"s3://{prefix}/out", mode="teacher-forced", storage=s3.options))
    assert summary.ok and summary.processed == 2
    files = sorted(fs.ls(f"{prefix}/out/predictions"))
    assert [f.rsplit("/", 1)[1] for f in files] == ["val-00000.parquet", "val-00001.parquet"]
    table = pa.concat_tables([pq.read_table(fs.open(f, "rb")) for f in files])
    assert_one_row_per_expression(table, shapes[:8])
    assert set(table.column("mode").to_pylist()) == {"teacher-forced"}
    assert all(r["forced_mask"] is not None for r in table.to_pylist())
    assert fs.exists(f"{prefix}/out/fingerprint.json") and len(fs.ls(f"{prefix}/out/done")) == 2
