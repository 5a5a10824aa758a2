"""Fast unit tests of the annotate job's pieces (no Ray cluster): text checks, config, layout, fingerprint,
the writer's part/merge logic, the decode and model stages called directly."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gsva.inputs import clean_expression, reserved_tokens
from pipeline import masks
from pipeline.annotate.config import AnnotateConfig, ConfigError, Scheduling, parse_replicas
from pipeline.annotate.decode import DecodeSpec, DecodeStage
from pipeline.annotate.fingerprint import FingerprintMismatch, check_or_record, checkpoint_identity, fingerprint
from pipeline.annotate.layout import OutputLayout, completed, list_inputs
from pipeline.annotate.model import ModelLoadError, ModelSpec
from pipeline.annotate.rows import DECODED_SCHEMA, PART_SCHEMA
from pipeline.annotate.sink import PredictionSink, Target
from pipeline.schemas import PREDICTION_SCHEMA, STATUS_ERROR, STATUS_OK, TASK_SCHEMA
from pipeline.storage import StorageOptions
from tests.test_annotate_support import FakePredictStage, png_bytes

RESERVED = reserved_tokens()


# ------------------------------------------------------------------------------------------------- text
@pytest.mark.parametrize("raw, expected", [
    ("the red circle", "the red circle"),
    ("  the   red\tcircle \n", "the red circle"),
    ("\u200bthe red\u200d circle\ufeff", "the red circle"),  # zero-width characters and BOM dropped
    ("\u202ethe red circle\u202c", "the red circle"),  # bidi override dropped
    ("ｔｈｅ ｒｅｄ ｃｉｒｃｌｅ", "the red circle"),  # full-width folded by NFKC
    ("the re\u0301d circle", "the réd circle"),  # combining accent composed
    ("the 🔴 circle", "the 🔴 circle"),
    ("l'objet à gauche", "l'objet à gauche"),
    ("the\x00red\x07circle", "theredcircle"),
])
def test_clean_expression_normalises_odd_unicode(raw, expected):
    result = clean_expression(raw, 256, RESERVED)
    assert (result.text, result.error) == (expected, None)


@pytest.mark.parametrize("raw, reason", [
    (None, "missing"), ("", "empty"), ("   \t", "empty"), ("\u200b\u200b", "no printable"),
    ("...", "no letters"), ("x" * 257, "257 characters long, over the limit of 256"),
    ("the [SEG] circle", "reserved token '[SEG]'"), ("a </s> b", "reserved token '</s>'"),
    ("bad \udc80 surrogate", "lone surrogate"), (7, "not a string"),
])
def test_clean_expression_rejects_with_reason(raw, reason):
    result = clean_expression(raw, 256, RESERVED)
    assert result.text is None and reason in result.error


# ----------------------------------------------------------------------------------------------- config
def test_replicas_and_config_validation():
    assert parse_replicas("3") == (3, 3) and parse_replicas("1,4") == (1, 4)
    for bad in ("0", "4,2", "a", "1,2,3"):
        with pytest.raises(ConfigError):
            AnnotateConfig("in", "out", scheduling=Scheduling(*parse_replicas(bad))).validate()
    with pytest.raises(ConfigError, match="--mode"):
        AnnotateConfig("in", "out", mode="sample").validate()
    with pytest.raises(ConfigError, match="choose one"):
        AnnotateConfig("in", "out", overwrite=True, retry_errors=True).validate()
    assert Scheduling(cpus_per_replica=0.5, decode_cpus=0.5).decode_task_cpus == 0.25  # stages never fuse
    assert Scheduling(cpus_per_replica=1.0, decode_cpus=0.25).decode_task_cpus == 0.25
    with pytest.raises(ConfigError, match="whole"):
        Scheduling(gpus_per_replica=1.5).validate()


# ------------------------------------------------------------------------------------ layout/fingerprint
def test_list_inputs_keys_and_skips_staging(tmp_path):
    for rel in ("val-00000.parquet", "sub/test-00001.parquet", "_staging/x.parquet", ".hidden.parquet",
                "_prepare.json", "raw/instances.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    files = list_inputs(str(tmp_path), StorageOptions())
    assert [f.key for f in files] == ["sub__test-00001", "val-00000"]
    assert list_inputs(str(tmp_path / "val-00000.parquet"), StorageOptions())[0].key == "val-00000"
    with pytest.raises(FileNotFoundError):
        list_inputs(str(tmp_path / "absent"), StorageOptions())


def test_fingerprint_recorded_then_enforced(tmp_path):
    layout = OutputLayout(str(tmp_path), StorageOptions())
    cfg = AnnotateConfig("in", str(tmp_path))
    identity = checkpoint_identity("tiny", StorageOptions())
    assert identity == "preset:tiny@seed0"
    assert check_or_record(layout, fingerprint(cfg, identity)) is True
    assert check_or_record(layout, fingerprint(cfg, identity)) is False  # same config resumes
    moved = AnnotateConfig("in", str(tmp_path), checkpoint="/elsewhere/same-weights")
    assert check_or_record(layout, fingerprint(moved, identity)) is False  # location is informational
    for changed in (AnnotateConfig("in", str(tmp_path), mode="teacher-forced"),
                    AnnotateConfig("in", str(tmp_path), max_expressions_per_prompt=2)):
        with pytest.raises(FingerprintMismatch, match="refusing to resume") as err:
            check_or_record(layout, fingerprint(changed, identity))
        assert "--overwrite" in str(err.value)
    with pytest.raises(FingerprintMismatch, match="model"):
        check_or_record(layout, fingerprint(cfg, "shapes@sha256:0123456789abcdef"))


def test_checkpoint_identity_reads_recorded_digest_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "format": "gsva-pipeline-checkpoint", "config": {"name": "shapes"},
        "weights": {"file": "model.safetensors", "sha256": "ab" * 32}}))
    assert checkpoint_identity(str(tmp_path), StorageOptions()) == "shapes@sha256:" + "ab" * 8
    with pytest.raises(FileNotFoundError, match="neither"):
        checkpoint_identity(str(tmp_path / "nope"), StorageOptions())


# ------------------------------------------------------------------------------------------------ writer
def _part_rows(key, image_ids, status=STATUS_OK, exprs_per_image=2):
    rows = []
    for img in image_ids:
        for pos in range(exprs_per_image):
            rows.append({"expression_id": f"{img}-{pos}", "image_id": img, "dataset": "d", "split": "val",
                         "text": "t", "rejected": False, "mask": masks.empty(2, 2), "status": status,
                         "error": None if status == STATUS_OK else "boom", "model": "m", "mode": "generate",
                         "_source": key, "_unit": 1 if pos == 0 else 0, "_pos": pos})
    return pa.Table.from_pylist(rows, schema=PART_SCHEMA)


def test_sink_finalises_each_input_once_complete_and_atomically(tmp_path):
    layout = OutputLayout(str(tmp_path), StorageOptions())
    sink = PredictionSink(layout, {"a": Target("in/a", 3), "b": Target("in/b", 1)}, run_id="r1")
    first = sink.write([_part_rows("a", ["2", "1"]), _part_rows("b", ["9"])], None)
    assert first["finalized"] == ["b"] and first["rows"] == 6
    assert not (tmp_path / "predictions" / "a.parquet").exists()
    again = sink.write([_part_rows("a", ["2", "1"])], None)  # a re-run batch overwrites its own part
    assert again["finalized"] == []
    last = sink.write([_part_rows("a", ["3"])], None)
    assert last["finalized"] == ["a"]
    table = pq.read_table(tmp_path / "predictions" / "a.parquet")
    assert table.schema.equals(PREDICTION_SCHEMA)
    assert table.column("expression_id").to_pylist() == ["1-0", "1-1", "2-0", "2-1", "3-0", "3-1"]
    assert not (tmp_path / "_staging" / "parts" / "a").exists()
    marker = completed(layout)["a"]
    assert (marker["rows"], marker["errors"], marker["run"]) == (6, 0, "r1")


def test_sink_placeholder_rows_count_but_are_not_written(tmp_path):
    layout = OutputLayout(str(tmp_path), StorageOptions())
    sink = PredictionSink(layout, {"a": Target("in/a", 2)}, run_id="r")
    empty_image = pa.Table.from_pylist([{"image_id": "0", "status": STATUS_OK, "_source": "a", "_unit": 1,
                                         "_pos": -1}], schema=PART_SCHEMA)
    assert sink.write([empty_image, _part_rows("a", ["1"])], None)["finalized"] == ["a"]
    assert pq.read_table(tmp_path / "predictions" / "a.parquet").num_rows == 2


def test_sink_retry_replaces_only_error_rows_in_place(tmp_path):
    layout = OutputLayout(str(tmp_path), StorageOptions())
    old = pa.concat_tables([_part_rows("a", ["1"]), _part_rows("a", ["2"], status=STATUS_ERROR)])
    base = tmp_path / "base.parquet"
    pq.write_table(old.select(PREDICTION_SCHEMA.names).cast(PREDICTION_SCHEMA), base)
    sink = PredictionSink(layout, {"a": Target("in/a", 1, base=str(base))}, run_id="r2")
    assert sink.write([_part_rows("a", ["2"])], None)["finalized"] == ["a"]
    table = pq.read_table(tmp_path / "predictions" / "a.parquet")
    assert table.column("expression_id").to_pylist() == ["1-0", "1-1", "2-0", "2-1"]
    assert set(table.column("status").to_pylist()) == {STATUS_OK}


# ------------------------------------------------------------------------------------------------ stages
def _task_row(image, exprs, image_id="1"):
    return {"image_id": image_id, "image": image, "image_uri": None, "width": None, "height": None,
            "split": "val", "dataset": "d", "path": "/in/a.parquet",
            "expressions": [{"expression_id": f"{image_id}-{i}", "text": t, "no_target": False}
                            for i, t in enumerate(exprs)]}


def _decode(rows):
    from pipeline.annotate.config import InputLimits

    stage = DecodeStage(DecodeSpec({"/in/a.parquet": "a"}, InputLimits(), StorageOptions(), RESERVED))
    schema = pa.schema([*TASK_SCHEMA, pa.field("path", pa.string())])
    return stage(pa.Table.from_pylist(rows, schema=schema))


def test_decode_stage_records_problems_on_the_row():
    rgb = np.full((20, 30, 3), 128, dtype=np.uint8)
    out = _decode([_task_row(png_bytes(rgb), ["the red circle", ""]), _task_row(b"not an image", ["x"], "2"),
                   _task_row(None, ["x"], "3")])
    assert out.schema.equals(DECODED_SCHEMA)
    ok, bad, missing = out.to_pylist()
    assert (ok["height"], ok["width"], ok["image_error"]) == (20, 30, None)
    assert np.frombuffer(ok["pixels"], np.uint8).reshape(20, 30, 3).tolist() == rgb.tolist()
    assert [e["error"] for e in ok["expressions"]] == [None, "expression is empty"]
    assert "not an image" in bad["image_error"] and bad["pixels"] is None
    assert "neither embedded image bytes nor an image_uri" in missing["image_error"]


def test_model_stage_gives_one_row_per_expression_and_isolates_failures():
    rgb = np.full((20, 30, 3), 128, dtype=np.uint8)
    decoded = _decode([_task_row(png_bytes(rgb), ["the red circle", "", "all squares"]),
                       _task_row(png_bytes(rgb), ["raise", "the blue square"], "2"),
                       _task_row(b"", ["x", "y"], "3"), _task_row(png_bytes(rgb), [], "4")])
    stage = FakePredictStage(ModelSpec("fake", "generate", 4, StorageOptions()))
    out = stage(decoded).to_pylist()
    by_id = {(r["image_id"], r["expression_id"]): r for r in out}
    assert len(out) == 8 and len(by_id) == 8  # 7 expressions + the placeholder of image 4
    assert by_id[("1", "1-0")]["status"] == STATUS_OK and by_id[("1", "1-0")]["mask"]["size"] == [20, 30]
    assert by_id[("1", "1-1")]["error"] == "expression is empty"
    assert by_id[("1", "1-2")]["status"] == STATUS_OK  # its neighbour's error did not spread
    assert all("fake model failure" in by_id[("2", e)]["error"] for e in ("2-0", "2-1"))
    assert all("zero-byte" in by_id[("3", e)]["error"] for e in ("3-0", "3-1"))
    assert by_id[("4", None)]["_pos"] == -1 and by_id[("4", None)]["_unit"] == 1
    assert sum(r["_unit"] for r in out) == 4  # exactly one unit per input image row


def test_teacher_forced_without_ground_truth_is_an_error_row():
    rgb = np.full((8, 8, 3), 10, dtype=np.uint8)
    row = _task_row(png_bytes(rgb), ["a", "b"])
    row["expressions"][1]["no_target"] = None
    stage = FakePredictStage(ModelSpec("fake", "teacher-forced", 4, StorageOptions()))
    out = stage(_decode([row])).to_pylist()
    assert out[0]["status"] == STATUS_OK and out[0]["forced_mask"]["size"] == [8, 8]
    assert out[1]["status"] == STATUS_ERROR and "no_target" in out[1]["error"]


def test_model_load_failure_is_one_clear_error(tmp_path):
    from jobs.annotate import model_load_message
    from pipeline.annotate.model import load_predictor

    with pytest.raises(ModelLoadError, match="cannot load the model from") as err:
        load_predictor(ModelSpec(str(tmp_path), "generate", 4, StorageOptions()))
    wrapped = RuntimeError("ray task failed")
    wrapped.__cause__ = err.value
    assert model_load_message(wrapped) == str(err.value)
    # an ActorDiedError carries the replica's exception only as text
    assert model_load_message(RuntimeError("x\nModelLoadError: cannot load the model from 'y'\n")) == \
        "cannot load the model from 'y'"
    assert model_load_message(RuntimeError("unrelated")) is None
