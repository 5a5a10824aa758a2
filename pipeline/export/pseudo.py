"""Task rows whose ground truth is the predictions (pure): pseudo-labels that jobs.train and jobs.score read.

Each kept expression gets `no_target` = the prediction's rejection, `gt_mask` = its mask (empty when rejected)
and `gt_boxes` = the mask's tight box (none when rejected; a predicted mask is one union, so one box). Kept:
status ok and score >= min_score. Everything else is counted by why, and an image with no kept expression
is not written.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipeline import masks
from pipeline.schemas import STATUS_OK

EXPORTED, BELOW_SCORE, ERROR, UNPREDICTED = "exported", "below_min_score", "error", "no_prediction"


def pseudo_label(task: dict[str, Any], predictions: dict[str, dict[str, Any]], min_score: float,
                 counts: Counter) -> dict[str, Any] | None:
    """One task row + its image's prediction rows (by expression_id) -> the pseudo-labelled task row, or None."""
    kept = []
    for expr in task.get("expressions") or []:
        pred = predictions.get(expr["expression_id"])
        if pred is None:
            counts[UNPREDICTED] += 1
        elif pred["status"] != STATUS_OK or pred["mask"] is None:
            counts[ERROR] += 1
        elif pred["score"] is None or pred["score"] < min_score:
            counts[BELOW_SCORE] += 1
        else:
            counts[EXPORTED] += 1
            rejected = bool(pred["rejected"])
            kept.append({"expression_id": expr["expression_id"], "text": expr["text"], "no_target": rejected,
                         "gt_mask": pred["mask"], "gt_boxes": [] if rejected else [masks.to_bbox(pred["mask"])]})
    if not kept:
        return None
    height, width = kept[0]["gt_mask"]["size"]  # manifests leave the size unknown; the masks know it
    return {**task, "height": task.get("height") or int(height), "width": task.get("width") or int(width),
            "expressions": kept}
