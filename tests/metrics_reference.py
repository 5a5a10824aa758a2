"""The straightforward scorer: one expression at a time, both masks decoded to dense arrays.

It restates the public evaluators (ReLA `ReferEvaluator`, GSVA `eval_gres`) line by line on numpy masks,
independently of `pipeline.score.metrics`. It is the yardstick of the benchmark (bench/score_bench.py) and the
cross-check of the fast RLE path in the tests; production scoring never uses it.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from pipeline import masks
from pipeline.schemas import STATUS_OK
from pipeline.score.metrics import PR_THRESHOLDS, REC_IOU_THRESHOLD


def _tight_box(m: np.ndarray) -> list[float] | None:
    ys, xs = np.nonzero(m)
    if not len(xs):
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _box_iou(a: list[float], b: list[float]) -> float:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _gt_box(gt_boxes, gt: np.ndarray) -> list[float]:
    boxes = [b for b in (gt_boxes or []) if b is not None and len(b) == 4]
    if not boxes:
        return _tight_box(gt) or [0.0, 0.0, 0.0, 0.0]
    x1 = min(b[0] for b in boxes)
    y1 = min(b[1] for b in boxes)
    return [x1, y1, max(b[0] + b[2] for b in boxes) - x1, max(b[1] + b[3] for b in boxes) - y1]


def reference_score(ground_truth: list[dict], predictions: list[dict], protocol: str,
                    by: tuple[str, ...] = ("split",)) -> dict[str, dict]:
    """Metrics per group name (and "overall") as plain dicts, from exploded ground-truth rows
    (dataset, expression_id, split, no_target, gt_mask, gt_boxes) and prediction rows."""
    preds: dict[tuple, dict] = {}
    for p in predictions:
        key = (p["dataset"], p["expression_id"])
        if key not in preds or (preds[key]["status"] != STATUS_OK and p["status"] == STATUS_OK):
            preds[key] = p
    acc: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    for g in ground_truth:
        if g["no_target"] is None or g["gt_mask"] is None:
            continue
        gt = masks.decode(g["gt_mask"])
        p = preds.get((g["dataset"], g["expression_id"]))
        ok = (p is not None and p["status"] == STATUS_OK and p["mask"] is not None
              and list(p["mask"]["size"]) == list(g["gt_mask"]["size"]))
        pred_nt = bool(ok and p["rejected"])
        pred = masks.decode(p["mask"]) if ok else np.zeros_like(gt)
        if pred_nt:
            pred = np.zeros_like(gt)  # a rejection is an empty mask
        scored = pred
        if protocol == "gsva" and ok and p.get("forced_mask") is not None \
                and list(p["forced_mask"]["size"]) == list(g["gt_mask"]["size"]):
            scored = masks.decode(p["forced_mask"])
        empty = gt.sum() < 1 if protocol == "gsva" else bool(g["no_target"])
        inter = int(np.logical_and(scored, gt).sum())
        union = int(np.logical_or(scored, gt).sum())
        for name in ("overall", "/".join(str(g[c]) if g[c] is not None else "none" for c in by)):
            a = acc[name]
            a["count"] += 1
            a["errors"] += not ok
            if empty:
                a["empty"] += 1
                if pred_nt:
                    a["TP"] += 1
                    a["IoU"] += 1.0
                else:
                    a["FN"] += 1
                    a["U"] += union
            else:
                a["targets"] += 1
                a["FP" if not ok or pred_nt else "TN"] += 1
                iou = inter / union if union > 0 else 0.0
                a["IoU"] += iou
                a["I"] += inter
                a["U"] += union
                for t in PR_THRESHOLDS:
                    a[f"pr{t}"] += iou >= t
            d_inter = int(np.logical_and(pred, gt).sum())
            d_union = int(np.logical_or(pred, gt).sum())
            a["mIoU"] += (d_inter / d_union) if d_union else (1.0 if ok else 0.0)
            if not g["no_target"]:
                a["rec_targets"] += 1
                box = _tight_box(pred)
                a["rec_hits"] += box is not None and _box_iou(box, _gt_box(g["gt_boxes"], gt)) >= REC_IOU_THRESHOLD
    out = {}
    for name, a in acc.items():
        def ratio(x, y):
            return x / y if y else None
        out[name] = {"giou": ratio(a["IoU"], a["count"]), "ciou": ratio(a["I"], a["U"]),
                     "n_acc": ratio(a["TP"], a["TP"] + a["FN"]), "t_acc": ratio(a["TN"], a["TN"] + a["FP"]),
                     **{f"pr@{t}": ratio(a[f"pr{t}"], a["targets"]) for t in PR_THRESHOLDS},
                     "miou": ratio(a["mIoU"], a["count"]),
                     f"rec_acc@{REC_IOU_THRESHOLD}": ratio(a["rec_hits"], a["rec_targets"]),
                     "count": int(a["count"]), "errors": int(a["errors"])}
    return out
