"""Metrics against hand-computed cases and against the straightforward dense evaluator (no Ray here).

Also the builders of small task shards and predictions in the real Parquet schemas, used by the job tests.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from pipeline import masks
from pipeline.prepare.formats import shapes
from pipeline.schemas import PREDICTION_SCHEMA, RLE_TYPE, TASK_SCHEMA
from pipeline.score import blocks as metrics_blocks
from pipeline.score import graph as scoring
from pipeline.score import masks as metrics_masks
from pipeline.score import metrics
from tests.metrics_reference import reference_score

H = W = 10


def box_mask(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def rle(m: np.ndarray | None) -> dict | None:
    return None if m is None else masks.encode(m)


EMPTY = np.zeros((H, W), bool)
G1 = box_mask(0, 5, 0, 5)  # 25 px
P1 = box_mask(0, 5, 0, 4)  # 20 px inside G1: IoU 0.8
G2 = box_mask(5, 10, 5, 10)
BLOB = box_mask(0, 2, 0, 5)  # 10 px


def inputs(rows: list[dict]) -> metrics.ExpressionInputs:
    """rows: no_target, gt (array), pred (array or None = failed), rejected, forced (array or None), boxes."""
    return metrics.ExpressionInputs(
        no_target=np.array([r["no_target"] for r in rows]),
        gt_mask=metrics_masks.Masks.from_rles([rle(r["gt"]) for r in rows]),
        gt_box=metrics_masks.enclosing_boxes(pa.array([r.get("boxes") for r in rows], type=metrics_masks.BOXES_TYPE)),
        failed=np.array([r["pred"] is None for r in rows]),
        rejected=np.array([r.get("rejected", False) for r in rows]),
        mask=metrics_masks.Masks.from_rles([rle(r["pred"]) for r in rows]),
        forced_mask=metrics_masks.Masks.from_rles([rle(r.get("forced")) for r in rows]))


# a: target, IoU 0.8 | b: target wrongly rejected, forced mask exact | c: no-target rejected
# d: no-target kept with an empty mask | e: no-target kept with a 10 px mask | f: target missing
# g: no-target with an error row
CASES = [
    dict(no_target=False, gt=G1, pred=P1, boxes=[[0, 0, 5, 5]]),
    dict(no_target=False, gt=G2, pred=EMPTY, rejected=True, forced=G2, boxes=[[5, 5, 5, 5]]),
    dict(no_target=True, gt=EMPTY, pred=EMPTY, rejected=True, forced=BLOB),
    dict(no_target=True, gt=EMPTY, pred=EMPTY),
    dict(no_target=True, gt=EMPTY, pred=BLOB),
    dict(no_target=False, gt=G1, pred=None, boxes=[[0, 0, 5, 5]]),
    dict(no_target=True, gt=EMPTY, pred=None),
]


def summary(rows, protocol):
    s = metrics.score_expressions(inputs(rows), protocol)
    flags = np.array([r["no_target"] for r in rows])
    return metrics.ScoreStats.from_scores(s, rec_target=~flags).metrics()


def test_rela_hand_computed():
    m = summary(CASES, "rela")
    assert m["giou"] == pytest.approx((0.8 + 1.0) / 7)
    assert m["ciou"] == pytest.approx(20 / (25 + 25 + 10 + 25))  # b and f add |GT|, e its 10 px
    assert m["n_acc"] == pytest.approx(1 / 4) and m["t_acc"] == pytest.approx(1 / 3)
    assert (m["pr@0.7"], m["pr@0.8"], m["pr@0.9"]) == pytest.approx((1 / 3, 1 / 3, 0.0))
    assert m["miou"] == pytest.approx((0.8 + 1 + 1) / 7)  # c, d: both empty -> 1; g failed -> 0
    assert m["rec_acc@0.5"] == pytest.approx(1 / 3)  # a's box IoU 0.8; b rejected and f missing miss
    assert (m["count"], m["errors"]) == (7, 2)


def test_gsva_keeps_forced_iou_of_rejected_target():
    m = summary(CASES, "gsva")
    assert m["giou"] == pytest.approx((0.8 + 1.0 + 1.0) / 7)  # b scores its forced mask's IoU 1
    assert m["ciou"] == pytest.approx((20 + 25) / (25 + 25 + 10 + 25))
    assert m["t_acc"] == pytest.approx(1 / 3)  # b is still a wrong decision
    assert (m["pr@0.7"], m["pr@0.9"]) == pytest.approx((2 / 3, 1 / 3))
    # Classic RES metrics are the same under both protocols.
    r = summary(CASES, "rela")
    assert (m["miou"], m["rec_acc@0.5"], m["n_acc"]) == (r["miou"], r["rec_acc@0.5"], r["n_acc"])


def test_protocols_define_no_target_differently():
    # A target whose ground-truth mask is empty (e.g. only crowd instances), predicted empty, not rejected.
    rows = [dict(no_target=False, gt=EMPTY, pred=EMPTY)]
    r, g = summary(rows, "rela"), summary(rows, "gsva")
    assert (r["giou"], r["t_acc"], r["n_acc"]) == (0.0, 1.0, None)  # ReLA: the flag says target
    assert (g["giou"], g["t_acc"], g["n_acc"]) == (0.0, None, 0.0)  # GSVA: empty GT = no-target, kept
    assert r["miou"] == 1.0  # classic: both empty


def test_gsva_without_forced_mask_scores_rejection_as_empty_and_counts_it():
    rows = [dict(no_target=False, gt=G1, pred=EMPTY, rejected=True)]
    s = metrics.score_expressions(inputs(rows), "gsva")
    assert s.iou.tolist() == [0.0] and s.forced_missing.tolist() == [True]


def test_all_rejected_all_empty_and_undefined():
    rej = [dict(no_target=False, gt=G1, pred=EMPTY, rejected=True),
           dict(no_target=True, gt=EMPTY, pred=EMPTY, rejected=True)]
    m = summary(rej, "rela")
    assert (m["giou"], m["ciou"], m["t_acc"], m["n_acc"], m["pr@0.7"]) == (0.5, 0.0, 0.0, 1.0, 0.0)
    empty = [dict(no_target=False, gt=G1, pred=EMPTY), dict(no_target=True, gt=EMPTY, pred=EMPTY)]
    m = summary(empty, "rela")
    assert (m["giou"], m["ciou"], m["t_acc"], m["n_acc"], m["miou"]) == (0.0, 0.0, 1.0, 0.0, 0.5)
    assert m["rec_acc@0.5"] == 0.0  # an empty mask misses
    only_nt = [dict(no_target=True, gt=EMPTY, pred=EMPTY, rejected=True)]
    m = summary(only_nt, "rela")
    assert m["giou"] == 1.0 and m["n_acc"] == 1.0
    assert all(m[k] is None for k in ("ciou", "t_acc", "pr@0.7", "rec_acc@0.5"))
    assert metrics.ScoreStats().metrics()["giou"] is None


def test_multi_target_iou_and_box_of_union():
    a, b = box_mask(0, 4, 0, 4), box_mask(6, 10, 6, 10)
    gt = a | b
    rows = [dict(no_target=False, gt=gt, pred=a, boxes=[[0, 0, 4, 4], [6, 6, 4, 4]]),
            dict(no_target=False, gt=gt, pred=box_mask(0, 10, 0, 10), boxes=[[0, 0, 4, 4], [6, 6, 4, 4]])]
    s = metrics.score_expressions(inputs(rows), "rela")
    assert s.iou.tolist() == pytest.approx([0.5, 32 / 100])
    # GT box = box enclosing both targets [0, 0, 10, 10]: one square covers 16 %, the full frame 100 %.
    assert s.rec_hit.tolist() == [False, True]
    boxes = metrics_masks.enclosing_boxes(pa.array([[[0, 0, 4, 4], [6, 6, 4, 4]], None, [[1, 2, 3]]],
                                             type=metrics_masks.BOXES_TYPE))
    assert boxes[0].tolist() == [0.0, 0.0, 10.0, 10.0] and np.isnan(boxes[1:]).all()


def test_mask_helpers_match_pycocotools_one_by_one():
    rng = np.random.default_rng(7)
    pairs = []
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        pairs.append((rng.random((h, w)) < rng.random(), rng.random((h, w)) < rng.random()))
    a = [masks.encode(p) for p, _ in pairs] + [None]
    b = [masks.encode(g) for _, g in pairs] + [masks.encode(EMPTY)]
    ma, mb = metrics_masks.Masks.from_rles(a), metrics_masks.Masks.from_rles(b)
    rows = np.arange(len(pairs))
    area_a, area_b = ma.areas(rows), mb.areas(rows)
    inter, union = masks.intersection_union(a[:-1], b[:-1])
    assert (metrics_masks.intersections(ma, mb, rows, area_a, area_b) == inter).all()
    assert (area_a + area_b - inter == union).all()
    assert ma.bboxes(rows).tolist() == [masks.to_bbox(r) for r in a[:-1]]
    assert ma.counts[-1] is None and ma.height[-1] == 0


def test_masks_same_as_takes_only_equal_usable_rles():
    """A forced mask read `same_as` the output mask takes its verdict only where both RLEs are equal and that
    one is usable: every field is as if it had been parsed on its own."""
    e = masks.empty(5, 7)
    box = masks.encode(np.pad(np.ones((2, 3), bool), ((1, 2), (2, 2))))
    output = [box, e, e, {"size": [5, 7], "counts": "0"}, None, box, box]
    forced = [box, {"size": [7, 5], "counts": e["counts"]}, {"size": [6, 7], "counts": e["counts"]},
              {"size": [5, 7], "counts": "0"}, box, None, e]
    out = metrics_masks.Masks.from_rles(output)
    alone = metrics_masks.Masks.from_rles(forced)
    reused = metrics_masks.Masks.from_arrow(pa.array(forced, type=RLE_TYPE),
                                            same_as=(pa.array(output, type=RLE_TYPE), out))
    for name in ("counts", "height", "width", "area", "invalid"):
        assert np.asarray(getattr(reused, name)).tolist() == np.asarray(getattr(alone, name)).tolist(), name
    assert reused.counts[0] is out.counts[0]  # the same object, not a second copy
    assert alone.invalid.tolist() == [False, False, True, True, False, False, False]
    assert alone.area.tolist() == [6, 0, 0, 0, 6, 0, 0]


def test_box_iou_and_hist():
    assert metrics.box_iou(np.array([[0, 0, 4, 4.0]]), np.array([[2, 0, 4, 4.0]])).tolist() == [8 / 24]
    s = metrics.score_expressions(inputs(CASES), "rela")
    stats = metrics.ScoreStats.from_scores(s, rec_target=~np.array([r["no_target"] for r in CASES]))
    assert sum(stats.iou_hist) == stats.targets == 3
    assert stats.iou_hist[16] == 1 and stats.iou_hist[0] == 2  # 0.8 and two zeros


def assert_same_stats(a: metrics.ScoreStats, b: metrics.ScoreStats) -> None:
    da, db = a.to_dict(), b.to_dict()
    for k in ("giou_sum", "miou_sum"):
        assert math.isclose(da.pop(k), db.pop(k), abs_tol=1e-12)
    assert da == db


def test_stats_merge_in_any_order():
    s = metrics.score_expressions(inputs(CASES), "gsva")
    flags = ~np.array([r["no_target"] for r in CASES])
    whole = metrics.ScoreStats.from_scores(s, flags)
    parts = [metrics.ScoreStats.from_scores(s, flags, select=np.arange(7) % 3 == k) for k in range(3)]
    merged = parts[2] + parts[0] + parts[1]
    assert_same_stats(merged, whole)
    assert metrics.ScoreStats.from_dict(merged.to_dict()) == merged


# ---- builders of real task shards / predictions, shared with the job tests ----

def _poly(shape: int, cx: float, cy: float, s: float) -> list[float]:
    """Shape index 0/1/2 (circle/square/triangle) -> the Shapes-GRES polygon."""
    return shapes.polygon(shapes.SHAPES[shape], cx, cy, s)


def synthetic(n_images: int, seed: int = 0, forced: bool = True, dataset: str = "shapes",
              image_bytes: bool = False) -> tuple[list[dict], list[dict]]:
    """Shapes-GRES-like task rows and imperfect predictions: no-target, multi-target, rejections,
    error rows, missing rows, a duplicate and a prediction without ground truth."""
    rng = np.random.default_rng(seed)
    tasks, preds = [], []
    for i in range(n_images):
        h, w = int(rng.integers(48, 72)), int(rng.integers(48, 72))
        split = ("val", "testA", "testB")[i % 3]
        exprs = []
        for e in range(4):
            eid = f"{dataset}-{i}-{e}"
            kind = rng.choice(3, p=[0.45, 0.35, 0.2])
            n_obj = 0 if kind == 2 else (1 if kind == 0 else int(rng.integers(2, 4)))
            objs = [(int(rng.integers(3)), float(rng.integers(12, w - 12)), float(rng.integers(12, h - 12)),
                     float(rng.integers(5, 10))) for _ in range(n_obj)]
            parts = [masks.from_polygons([_poly(*o)], h, w) for o in objs]
            exprs.append({"expression_id": eid, "text": f"thing {e} of image {i}", "no_target": n_obj == 0,
                          "gt_mask": masks.union(parts, h, w), "gt_boxes": [masks.to_bbox(p) for p in parts]})
            r = rng.random()
            moved = [(o[0], o[1] + rng.normal(0, 2), o[2] + rng.normal(0, 2), o[3] * rng.uniform(0.8, 1.2))
                     for o in objs]
            guess = masks.union([masks.from_polygons([_poly(*o)], h, w) for o in moved], h, w)
            if n_obj == 0 and r < 0.3:
                guess = masks.from_polygons([_poly(1, w / 2, h / 2, 6)], h, w)
            rejected = (n_obj == 0 and r < 0.6) or (n_obj > 0 and r < 0.1)
            status = "error" if r > 0.95 else "ok"
            if r > 0.985:
                continue  # missing prediction
            preds.append({"expression_id": eid, "image_id": str(i), "dataset": dataset, "split": split,
                          "text": exprs[-1]["text"], "rejected": rejected,
                          "mask": None if status == "error" else (masks.empty(h, w) if rejected else guess),
                          "forced_mask": guess if forced and status == "ok" else None, "score": 0.9,
                          "answer": "", "status": status, "error": "boom" if status == "error" else None,
                          "model": "tiny-test", "mode": "teacher-forced" if forced else "generate"})
        image = None
        if image_bytes:
            import io

            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(rng.integers(150, 230, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
            image = buf.getvalue()
        tasks.append({"image_id": str(i), "image": image, "image_uri": None, "width": w, "height": h,
                      "split": split, "dataset": dataset, "expressions": exprs})
    if preds:
        preds.append(dict(preds[0], status="error", mask=None, error="retry"))  # a duplicate, ignored
        preds.append(dict(preds[0], expression_id="no-such-expression"))  # no ground truth
    return tasks, preds


def exploded(tasks: list[dict]) -> list[dict]:
    return [dict(e, dataset=t["dataset"], split=t["split"]) for t in tasks for e in t["expressions"]]


def score_in_process(tasks, preds, protocol, by=("split",), buckets=3) -> scoring.ScoreResult:
    """The Ray graph's stages run in this process: explode, key, bucket, score, reduce."""
    gt = metrics_blocks.explode_ground_truth(pa.Table.from_pylist(tasks, schema=TASK_SCHEMA), buckets)
    pr = metrics_blocks.key_predictions(pa.Table.from_pylist(preds, schema=PREDICTION_SCHEMA), buckets)
    both = pa.concat_tables([gt, pr])
    rows = []
    for b in range(buckets):
        part = both.filter(pa.compute.equal(both.column("bucket"), b))
        rows += metrics_blocks.score_bucket(part, protocol, tuple(by), 4).to_pylist()
    return scoring.reduce_partials(rows)


def assert_same(result_metrics: dict, reference: dict) -> None:
    for k, v in reference.items():
        got = result_metrics[k]
        assert (got is None) == (v is None), k
        assert v is None or math.isclose(got, v, rel_tol=0, abs_tol=1e-12), (k, got, v)


@pytest.mark.parametrize("protocol", metrics.PROTOCOLS)
def test_rle_scoring_matches_dense_reference(protocol):
    tasks, preds = synthetic(40, seed=3)
    result = score_in_process(tasks, preds, protocol, by=("split", "dataset"))
    ref = reference_score(exploded(tasks), preds, protocol, by=("split", "dataset"))
    assert_same(result.overall.metrics(), ref["overall"])
    assert set(result.groups) == set(ref) - {"overall"} == {"val/shapes", "testA/shapes", "testB/shapes"}
    for name, stats in result.groups.items():
        assert_same(stats.metrics(), ref[name])
    inp = result.inputs
    assert inp.scored == 160 and inp.duplicates == 1 and inp.without_ground_truth == 1
    assert inp.without_ground_truth_examples == ["shapes/no-such-expression"]
    assert inp.missing + inp.error_status == result.overall.errors > 0
    assert inp.models == ["tiny-test"] and inp.modes == ["teacher-forced"]
    picked = result.cases.cases
    assert len(picked["best"]) == len(picked["worst"]) == len(picked["rejected"]) == 4
    assert picked["best"][0]["iou"] >= picked["best"][-1]["iou"] >= picked["worst"][-1]["iou"]
    assert all(c["decision"] == "rej" for c in picked["rejected"])


def test_bucketing_does_not_change_numbers():
    tasks, preds = synthetic(20, seed=5)
    one = score_in_process(tasks, preds, "rela", buckets=1)
    many = score_in_process(tasks, preds, "rela", buckets=7)
    assert_same_stats(one.overall, many.overall)
    assert one.inputs == many.inputs
    assert one.cases.to_dict() == many.cases.to_dict()


def test_bad_rows_are_counted_not_lost():
    tasks, preds = synthetic(3, seed=1)
    # Unlabelled ground truth is not scored; a mask of the wrong size counts as an error.
    tasks[0]["expressions"][0]["no_target"] = None
    target = next(p for p in preds if p["image_id"] == "1" and p["status"] == "ok")
    target["mask"] = masks.empty(5, 5)
    result = score_in_process(tasks, preds, "rela")
    assert result.inputs.unlabelled == 1 and result.inputs.bad_masks == 1
    assert result.overall.count == 11


def test_duplicate_ground_truth_is_named():
    tasks, preds = synthetic(1, seed=1)
    tasks[0]["expressions"].append(dict(tasks[0]["expressions"][0]))
    with pytest.raises(ValueError, match="shapes-0-0"):
        score_in_process(tasks, preds, "rela")


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="rejected"):
        metrics_blocks.key_predictions(pa.table({"expression_id": ["a"], "dataset": ["d"], "mask": [None],
                                          "status": ["ok"]}), 2)
    with pytest.raises(ValueError, match="protocol"):
        scoring.ScoreConfig("p", "g", protocol="lisa")
    with pytest.raises(ValueError, match="--by"):
        scoring.ScoreConfig("p", "g", by=("image",))


def _parse_like_pycocotools(counts: bytes, h: int, w: int) -> bool:
    """pycocotools' rleFrString in plain Python, with the bounds checks it lacks: is this RLE valid?"""
    if h < 0 or w < 0:
        return False
    runs, p = [], 0
    while p < len(counts):
        x = k = 0
        more = True
        while more:
            if p >= len(counts) or not 0 <= counts[p] - 48 <= 63:
                return False
            c = counts[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more, p, k = bool(c & 0x20), p + 1, k + 1
            if not more and c & 0x10:
                x -= 1 << (5 * k)
        if k > 7:
            return False
        runs.append(x + (runs[-2] if len(runs) > 2 else 0))
    return all(0 <= r < 2**32 for r in runs) and sum(runs) == h * w


@pytest.mark.timeout(120)
def test_rle_validation_matches_pycocotools_and_refuses_garbage():
    """Every RLE pycocotools writes is valid; on random strings the vectorised validator agrees with a plain
    parse of pycocotools' format, and what it accepts decodes to h x w with pycocotools; garbage (bytes outside
    the alphabet, a run cut off, counts not adding up to h*w, a negative size) is refused."""
    rng = np.random.default_rng(7)
    written = [masks.encode(rng.random((int(h), int(w))) < rng.random()) for h, w in rng.integers(1, 40, (200, 2))]
    heights, widths = np.array([r["size"][0] for r in written]), np.array([r["size"][1] for r in written])
    assert masks.rle_problems([r["counts"] for r in written], heights, widths) == [None] * len(written)
    strings = [bytes(rng.integers(48, 112 if rng.random() < 0.9 else 130, int(rng.integers(0, 14))).astype(np.uint8))
               for _ in range(20000)]
    hs, ws = rng.integers(-1, 6, len(strings)), rng.integers(0, 6, len(strings))
    verdicts = masks.rle_problems(strings, hs, ws)
    assert [v is None for v in verdicts] == [_parse_like_pycocotools(s, int(h), int(w))
                                             for s, h, w in zip(strings, hs, ws)]
    accepted = [i for i, v in enumerate(verdicts) if v is None]
    assert len(accepted) > 100
    for i in accepted:
        h, w = int(hs[i]), int(ws[i])
        assert masks.decode({"size": [h, w], "counts": strings[i].decode()}).shape == (h, w)
    for rle, problem in (({"size": [5, 7], "counts": "0"}, "add up to 0 pixels, not h*w = 35"),
                         ({"size": [5, 7], "counts": "PPP\x7f~"}, "outside COCO's RLE alphabet"),
                         ({"size": [5, 7], "counts": "PPP"}, "middle of a run"),
                         ({"size": [-5, 7], "counts": "0"}, "negative size"),
                         ({"size": [5], "counts": "0"}, "not [height, width]"),
                         ({"size": [6, 7], "counts": masks.empty(5, 7)["counts"]}, "not h*w = 42")):
        assert problem in masks.rle_problem(rle), rle
        with pytest.raises(ValueError, match="invalid RLE"):
            masks.decode(rle)
    assert masks.rle_problem(None) is None and masks.rle_problem({"size": [0, 0], "counts": ""}) is None
    # The Arrow path (buffers read in place, nulls and slice offsets honoured) gives the same verdicts.
    counts = [None, "0", "PPP", masks.empty(5, 7)["counts"], "", None, "PPP\x7f~"]
    h, w = np.array([5, 5, 5, 5, 0, 1, 5] * 2), np.array([7] * 14)
    listed = masks.rle_problems(counts * 2, h, w)
    assert masks.rle_problems(pa.array(counts * 2, pa.string()), h, w) == listed
    assert masks.rle_problems(pa.array([None] + counts * 2, pa.binary()).slice(1), h, w) == listed
    assert [p is None for p in listed[:7]] == [True, False, False, True, True, True, False]
