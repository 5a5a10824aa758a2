"""Referring-segmentation metrics as pure functions over RLE masks, reduced through mergeable sums.

Per expression, `score_expressions` turns ground truth and a prediction into a few numbers (IoU,
intersection, union, decision outcome, box hit) without decoding any mask; `ScoreStats` holds their
sums and counts, adds with `+` (so per-block partials reduce in any order) and turns into the metrics.

Definitions (carried over from the public evaluators, see README "Metrics"):
- `rela`, the gRefCOCO authors' evaluator (ReLA `ReferEvaluator`): no-target = the expression's
  `no_target` flag. A no-target expression scores IoU 1 if rejected, else 0 and its predicted mask's
  area joins the cIoU union. A target scores I/U of the predicted mask, where a rejection is an empty
  mask. gIoU = mean IoU over all expressions, cIoU = sum I / sum U, N-acc = TP / (TP + FN) over
  no-target, T-acc = TN / (TN + FP) over targets, Pr@X = share of targets with IoU >= X.
- `gsva`, GSVA's `eval_gres`: no-target = the ground-truth mask is empty. A target scores the IoU of the
  mask the model gave for it (`forced_mask`, the REJ->SEG re-run) even when it was rejected; a no-target
  not rejected scores 0 whatever its mask. The rest as `rela`.
- Classic RES, the same under both protocols, on the mask the model outputs (rejection = empty):
  mIoU = mean per-expression IoU (1 when both masks are empty); REC Acc@0.5 = share of targets whose
  predicted mask's tight box has IoU >= 0.5 with the ground-truth box (an empty mask misses).
- A failed expression (prediction missing, `status = "error"`, or an unusable mask: null, invalid RLE, or of
  another size than the ground truth) counts against
  the model both ways: a target as rejected (IoU 0), a no-target as not rejected (IoU 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from pipeline.score.masks import Masks, intersections

PROTOCOLS = ("rela", "gsva")
PR_THRESHOLDS = (0.7, 0.8, 0.9)
REC_IOU_THRESHOLD = 0.5
HIST_BINS = 20  # per-expression IoU histogram of targets, bins of width 1/HIST_BINS
METRIC_KEYS = ("giou", "ciou", "n_acc", "t_acc", *(f"pr@{t}" for t in PR_THRESHOLDS), "miou",
               f"rec_acc@{REC_IOU_THRESHOLD}", "count", "errors")
#: How reports print each fraction metric (the papers' names).
METRIC_LABELS = {"giou": "gIoU", "ciou": "cIoU", "n_acc": "N-acc", "t_acc": "T-acc",
                 **{f"pr@{t}": f"Pr@{t}" for t in PR_THRESHOLDS}, "miou": "mIoU",
                 f"rec_acc@{REC_IOU_THRESHOLD}": f"REC Acc@{REC_IOU_THRESHOLD}"}


@dataclass
class ExpressionInputs:
    """One scored expression per position."""

    no_target: np.ndarray  # bool, the ground truth's flag
    gt_mask: Masks
    gt_box: np.ndarray  # (N, 4) enclosing box of the targets (`enclosing_boxes`), NaN where none
    failed: np.ndarray  # bool: prediction missing, status error or unusable mask
    rejected: np.ndarray  # bool, the model's decision (ignored where failed)
    mask: Masks  # the prediction (no mask where failed)
    forced_mask: Masks  # teacher-forced REJ->SEG mask, no mask where not written


@dataclass
class ExpressionScores:
    """Per-expression numbers under one protocol (arrays of equal length)."""

    no_target: np.ndarray  # bool, under the protocol's definition
    positive: np.ndarray  # bool: the decision was right (no-target rejected / target kept)
    iou: np.ndarray  # float64, the protocol's per-expression IoU (gIoU term)
    inter: np.ndarray  # int64, cIoU numerator term
    union: np.ndarray  # int64, cIoU denominator term
    miou: np.ndarray  # float64, classic per-expression IoU
    rec_hit: np.ndarray  # bool, box IoU >= REC_IOU_THRESHOLD (targets only)
    failed: np.ndarray  # bool
    forced_missing: np.ndarray  # bool: gsva needed a forced mask for a rejected target and had none


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of (N, 4) boxes [x, y, w, h] row by row; 0 where the union is empty."""
    x1 = np.maximum(a[:, 0], b[:, 0])
    y1 = np.maximum(a[:, 1], b[:, 1])
    x2 = np.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2])
    y2 = np.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
    return np.divide(inter, union, out=np.zeros(len(a)), where=union > 0)


def _iou(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    return np.divide(inter, union, out=np.zeros(len(inter)), where=union > 0)


def score_expressions(inp: ExpressionInputs, protocol: str) -> ExpressionScores:
    """Per-expression statistics of one block under `protocol` ("rela" or "gsva"); no dense decoding."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    n = len(inp.gt_mask)
    everything = np.arange(n)
    failed = np.asarray(inp.failed, dtype=bool)
    rejected = np.asarray(inp.rejected, dtype=bool) & ~failed
    gt_area = inp.gt_mask.areas(everything)

    # The mask the model outputs: empty where rejected or failed.
    idx = np.flatnonzero(~failed & ~rejected)
    pred_area = np.zeros(n, np.int64)
    pred_area[idx] = inp.mask.areas(idx)
    inter_d = np.zeros(n, np.int64)
    inter_d[idx] = intersections(inp.mask, inp.gt_mask, idx, pred_area[idx], gt_area[idx])
    union_d = pred_area + gt_area - inter_d

    # The mask GSVA scores: the forced (REJ->SEG) mask where one was written, else the output mask.
    inter_s, union_s, forced_missing = inter_d, union_d, np.zeros(n, bool)
    if protocol == "gsva":
        has_forced = np.array([c is not None for c in inp.forced_mask.counts], dtype=bool) & ~failed
        fidx = np.flatnonzero(has_forced & (rejected | np.array(
            [f != m for f, m in zip(inp.forced_mask.counts, inp.mask.counts)], dtype=bool)))
        inter_s, union_s = inter_d.copy(), union_d.copy()
        f_area = inp.forced_mask.areas(fidx)
        inter_s[fidx] = intersections(inp.forced_mask, inp.gt_mask, fidx, f_area, gt_area[fidx])
        union_s[fidx] = f_area + gt_area[fidx] - inter_s[fidx]
        no_target = gt_area == 0
        forced_missing = rejected & ~no_target & ~has_forced
    else:
        no_target = np.asarray(inp.no_target, dtype=bool)

    # Decision outcome: a failed expression counts as the wrong decision both ways.
    positive = np.where(no_target, rejected, ~rejected & ~failed)
    iou = np.where(no_target, positive.astype(np.float64), _iou(inter_s, union_s))
    # A no-target expression adds nothing when rejected, else its union (= its predicted area).
    inter = np.where(no_target, 0, inter_s)
    union = np.where(no_target & positive, 0, union_s)

    miou = _iou(inter_d, union_d)
    miou[(union_d == 0) & ~failed] = 1.0  # both empty

    rec_hit = np.zeros(n, bool)
    tidx = np.flatnonzero(~np.asarray(inp.no_target, dtype=bool) & (pred_area > 0))
    if len(tidx):
        gt_box = np.asarray(inp.gt_box, np.float64)[tidx]
        none = np.isnan(gt_box).any(axis=1)
        gt_box[none] = inp.gt_mask.bboxes(tidx[none])
        rec_hit[tidx] = box_iou(inp.mask.bboxes(tidx), gt_box) >= REC_IOU_THRESHOLD

    return ExpressionScores(no_target=no_target, positive=positive, iou=iou, inter=inter.astype(np.int64),
                            union=union.astype(np.int64), miou=miou, rec_hit=rec_hit, failed=failed,
                            forced_missing=forced_missing)


@dataclass
class ScoreStats:
    """Mergeable sums and counts of one group of expressions (split, dataset, block...)."""

    count: int = 0
    errors: int = 0
    targets: int = 0  # under the protocol's no-target definition
    no_targets: int = 0
    tp: int = 0  # no-target, rejected
    fn: int = 0  # no-target, not rejected
    tn: int = 0  # target, kept
    fp: int = 0  # target, rejected
    giou_sum: float = 0.0
    inter: int = 0
    union: int = 0
    pr_hits: list[int] = field(default_factory=lambda: [0] * len(PR_THRESHOLDS))
    miou_sum: float = 0.0
    rec_targets: int = 0  # targets by the `no_target` flag (classic RES)
    rec_hits: int = 0
    iou_hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)  # targets' protocol IoU
    forced_missing: int = 0

    @classmethod
    def from_scores(cls, s: ExpressionScores, rec_target: np.ndarray,
                    select: np.ndarray | None = None) -> ScoreStats:
        """Sums over the expressions where `select` is True (all when None).

        `rec_target` marks the classic-RES targets (the `no_target` flag is False).
        """
        sel = np.ones(len(s.iou), bool) if select is None else np.asarray(select, bool)
        nt, tg = sel & s.no_target, sel & ~s.no_target
        t_iou = s.iou[tg]
        bins = np.minimum((t_iou * HIST_BINS).astype(np.int64), HIST_BINS - 1)
        return cls(
            count=int(sel.sum()), errors=int((sel & s.failed).sum()),
            targets=int(tg.sum()), no_targets=int(nt.sum()),
            tp=int((nt & s.positive).sum()), fn=int((nt & ~s.positive).sum()),
            tn=int((tg & s.positive).sum()), fp=int((tg & ~s.positive).sum()),
            giou_sum=float(s.iou[sel].sum()), inter=int(s.inter[sel].sum()), union=int(s.union[sel].sum()),
            pr_hits=[int((t_iou >= t).sum()) for t in PR_THRESHOLDS],
            miou_sum=float(s.miou[sel].sum()),
            rec_targets=int((sel & rec_target).sum()), rec_hits=int((sel & rec_target & s.rec_hit).sum()),
            iou_hist=np.bincount(bins, minlength=HIST_BINS).astype(int).tolist(),
            forced_missing=int((sel & s.forced_missing).sum()),
        )

    def __add__(self, other: ScoreStats) -> ScoreStats:
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            out[f.name] = [x + y for x, y in zip(a, b)] if isinstance(a, list) else a + b
        return ScoreStats(**out)

    def to_dict(self) -> dict:
        return {f.name: (list(getattr(self, f.name)) if f.name in ("pr_hits", "iou_hist")
                         else getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> ScoreStats:
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def metrics(self) -> dict:
        """The reported metrics: fractions in [0, 1], None where undefined (e.g. N-acc without no-target)."""

        def ratio(a: float, b: float) -> float | None:
            return a / b if b else None

        out = {"giou": ratio(self.giou_sum, self.count), "ciou": ratio(self.inter, self.union),
               "n_acc": ratio(self.tp, self.tp + self.fn), "t_acc": ratio(self.tn, self.tn + self.fp)}
        for t, hits in zip(PR_THRESHOLDS, self.pr_hits):
            out[f"pr@{t}"] = ratio(hits, self.targets)
        out["miou"] = ratio(self.miou_sum, self.count)
        out[f"rec_acc@{REC_IOU_THRESHOLD}"] = ratio(self.rec_hits, self.rec_targets)
        out["count"] = self.count
        out["errors"] = self.errors
        return out
