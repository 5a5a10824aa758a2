"""`python -m gsva predict`: one image, a few expressions -> printed decisions, overlay.png, predictions.json;
on the shipped model its masks equal the annotate job's for the same image (same predictor call, same prompts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import jobs.annotate as annotate_job
import jobs.prepare as prepare_job
from gsva.__main__ import main
from pipeline import masks
from pipeline.prepare.formats import shapes
from tests.test_annotate_job import SMALL
from tests.test_gsva_standalone import BLOCK_PIPELINE, REPO

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-gres"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def shapes_raw(tmp_path_factory) -> Path:
    """Two Shapes-GRES images and their gRefCOCO-format files (the project's generator)."""
    root = tmp_path_factory.mktemp("shapes") / "raw"
    shapes.generate(str(root), 2, 0)
    return root


def expressions_of(raw: Path, image_id: int) -> list[str]:
    refs = json.loads((raw / "grefs(unc).json").read_text())
    return [s["sent"] for r in refs if r["image_id"] == image_id for s in r["sentences"]]


def run_predict(capsys, *args: str) -> tuple[int, list[str], str]:
    code = main(["predict", *args])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_predict_tiny_writes_overlay_and_rle_predictions(shapes_raw, tmp_path, capsys):
    image = shapes_raw / "images" / "shapes_000001.png"
    out = tmp_path / "out"
    code, lines, _ = run_predict(capsys, "--checkpoint", "tiny", str(image), "the red triangle", "",
                                 "the [REJ] square", "the green square", "--out", str(out))
    assert code == 0
    rows = [line for line in lines if line[:4].strip().rstrip(".").isdigit()]
    assert len(rows) == 4 and "error  expression is empty" in rows[1] and "reserved token '[REJ]'" in rows[2]
    assert (out / "overlay.png").read_bytes()[:8] == PNG_MAGIC
    doc = json.loads((out / "predictions.json").read_text())
    height, width = np.asarray(Image.open(image)).shape[:2]
    assert (doc["height"], doc["width"]) == (height, width) and doc["mode"] == "generate"
    assert [e["text"] for e in doc["expressions"]] == ["the red triangle", "", "the [REJ] square", "the green square"]
    for n in (0, 3):
        e = doc["expressions"][n]
        mask = masks.decode(e["mask"])  # the RLE is COCO's compressed form, at the original size
        assert mask.shape == (height, width) and int(mask.sum()) == e["area"]
        assert e["decision"] in ("seg", "rej") and 0.0 <= e["score"] <= 1.0
        assert f"area={e['area']:>7} px" in rows[n] and f"p={e['score']:.3f}" in rows[n]
        assert not (e["rejected"] and e["area"])
    assert doc["expressions"][1]["mask"] is None and doc["expressions"][1]["error"] == "expression is empty"


def test_predict_teacher_forced_and_refusals(shapes_raw, tmp_path, capsys):
    image = str(shapes_raw / "images" / "shapes_000001.png")
    code, _, _ = run_predict(capsys, "--checkpoint", "tiny", image, "a", "b", "--mode", "teacher-forced",
                             "--no-target", "2", "--out", str(tmp_path / "tf"))
    assert code == 0
    doc = json.loads((tmp_path / "tf" / "predictions.json").read_text())
    assert all(e["forced_mask"] is not None for e in doc["expressions"])  # REJ->SEG re-run: every expression
    for args, message in [(["--no-target", "3"], "not an expression number between 1 and 2"),
                          ([], "no such file")]:
        target = image if args else str(tmp_path / "missing.png")
        code, _, err = run_predict(capsys, "--checkpoint", "tiny", target, "a", "b", *args)
        assert code == 2 and err.strip().startswith("predict:") and message in err and "Traceback" not in err
    (tmp_path / "junk.png").write_bytes(b"not an image")
    code, _, err = run_predict(capsys, "--checkpoint", "tiny", str(tmp_path / "junk.png"), "a")
    assert code == 2 and "not an image" in err
    code, _, err = run_predict(capsys, "--checkpoint", str(tmp_path / "nowhere"), image, "a")
    assert code == 2 and "cannot load the model" in err


def test_predict_masks_equal_annotate_on_the_shipped_model(ray_local, shapes_raw, tmp_path, capsys):
    """The same image and expressions through annotate (a one-image manifest) and predict: identical RLEs."""
    image = shapes_raw / "images" / "shapes_000002.png"
    texts = expressions_of(shapes_raw, 2) + ["the blue triangle", "the yellow square"]
    assert len(texts) > 4  # more than one conversation of K expressions
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(image), "expression": t}) + "\n" for t in texts))
    tasks, output = tmp_path / "tasks", tmp_path / "annotate"
    assert prepare_job.main(["--format", "manifest", "--root", str(manifest), "--out", str(tasks)]) == 0
    assert annotate_job.main(["--input", str(tasks), "--output", str(output), "--checkpoint", str(SHIPPED),
                              *SMALL]) == 0
    (file,) = (output / "predictions").glob("*.parquet")
    annotated = pq.read_table(file).to_pylist()
    code, _, _ = run_predict(capsys, "--checkpoint", str(SHIPPED), str(image), *texts, "--out", str(tmp_path / "p"))
    assert code == 0
    predicted = json.loads((tmp_path / "p" / "predictions.json").read_text())["expressions"]
    assert [r["text"] for r in annotated] == [e["text"] for e in predicted] == texts
    for a, p in zip(annotated, predicted):
        assert a["mask"] == p["mask"] and a["rejected"] == p["rejected"]
        assert a["score"] == pytest.approx(p["score"], abs=1e-6)
    assert any(masks.area(a["mask"]) for a in annotated)  # a non-trivial comparison
    assert (tmp_path / "p" / "overlay.png").read_bytes()[:8] == PNG_MAGIC


def test_predict_runs_without_pipeline(shapes_raw, tmp_path):
    """`python -m gsva predict` is part of the model package: it works with `pipeline` unimportable."""
    script = BLOCK_PIPELINE + (
        "from gsva.__main__ import main\n"
        "code = main(sys.argv[1:])\n"
        "assert not any(m.startswith('pipeline') for m in sys.modules)\n"
        "sys.exit(code)\n")
    image = shapes_raw / "images" / "shapes_000001.png"
    result = subprocess.run([sys.executable, "-c", script, "predict", "--checkpoint", str(SHIPPED), str(image),
                             "the red triangle", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the red triangle" in result.stdout and (tmp_path / "overlay.png").exists()
