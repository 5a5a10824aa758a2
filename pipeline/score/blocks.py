"""Per-block work of the score job, pure pyarrow/numpy (no Ray): key both inputs, then score one bucket.

Ground truth (task shards, one row per image) and predictions (one row per expression) become rows of one
KEYED_SCHEMA, hashed on (dataset, expression_id) into buckets, or on expression_id alone when the predictions
carry no `dataset` (`by_dataset=False`: minimal predictions of another system; the groups then come from the
ground truth, whose expression ids must be unique). `score_bucket` receives every row of a
bucket, joins them locally, scores each labelled expression from its RLEs and returns partial sums
(`ScoreStats` per group, `InputCounts`, `CaseBook`) as JSON rows, which `pipeline.score.graph` adds up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.parquet import PATH_COLUMN
from pipeline.schemas import RLE_TYPE, STATUS_OK
from pipeline.score import metrics
from pipeline.score.cases import CaseBook, decision_label
from pipeline.score.masks import Masks, enclosing_boxes

KEY_SEPARATOR = "\x1f"
GT_COLUMNS = ["image_id", "split", "dataset", "expressions"]
SOURCE_COLUMN = PATH_COLUMN  # added by pipeline.parquet.read_parquet(include_paths=True)
PREDICTION_REQUIRED = ["expression_id", "rejected", "mask"]
#: Read where present; absent ones are null. A null `status` counts as "ok" (a system without the column).
PREDICTION_OPTIONAL = ["status", "dataset", "image_id", "split", "text", "forced_mask", "model", "mode"]
EXAMPLES_KEPT = 5  # unmatched prediction keys quoted in the report
KEYED_SCHEMA = pa.schema([
    ("side", pa.string()), ("bucket", pa.int64()), ("rank", pa.int64()), ("source", pa.string()),
    ("dataset", pa.string()), ("expression_id", pa.string()), ("image_id", pa.string()),
    ("split", pa.string()), ("text", pa.string()),
    ("no_target", pa.bool_()), ("gt_mask", RLE_TYPE), ("gt_boxes", pa.list_(pa.list_(pa.float64()))),
    ("rejected", pa.bool_()), ("mask", RLE_TYPE), ("forced_mask", RLE_TYPE), ("status", pa.string()),
    ("model", pa.string()), ("mode", pa.string()),
])
#: Columns of a bucket's rows read after the join, by side.
GT_SCORED = ["dataset", "expression_id", "image_id", "split", "text", "no_target", "gt_mask", "gt_boxes", "rank",
             "source"]
PREDICTION_SCORED = ["side", "status", "rejected", "mask", "forced_mask"]
PARTIAL_SCHEMA = pa.schema([("kind", pa.string()), ("group", pa.string()), ("payload", pa.string())])


@dataclass
class InputCounts:
    """Bookkeeping of what was read and what could not be scored (mergeable)."""

    predictions_read: int = 0
    ground_truth_expressions: int = 0
    unlabelled: int = 0  # ground-truth rows without labels (no_target / gt_mask null): not scored
    scored: int = 0
    missing: int = 0  # labelled expressions without any prediction
    error_status: int = 0
    bad_masks: int = 0  # status ok but mask null, invalid RLE (score.masks) or of another size than the ground truth
    bad_forced_masks: int = 0  # forced_mask invalid or of another size: ignored
    bad_gt_masks: int = 0  # ground-truth masks that are invalid RLE: their expressions are not scored
    duplicates: int = 0  # extra predictions for an already predicted key: ignored
    without_ground_truth: int = 0  # predictions whose key has no labelled ground truth: reported only
    without_ground_truth_examples: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)

    def __add__(self, other: InputCounts) -> InputCounts:
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            out[f.name] = a + b if isinstance(a, int) else sorted(set(a) | set(b))
        out["without_ground_truth_examples"] = out["without_ground_truth_examples"][:EXAMPLES_KEPT]
        return InputCounts(**out)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> InputCounts:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def _key_hash(dataset: pa.Array, expression_id: pa.Array) -> np.ndarray:
    """Stable 64-bit hash of (dataset, expression_id), the same in every process (pandas' fixed-key SipHash)."""
    import pandas as pd

    joined = pc.binary_join_element_wise(pc.fill_null(dataset, ""), pc.fill_null(expression_id, ""),
                                         KEY_SEPARATOR)
    values = np.asarray(joined.to_numpy(zero_copy_only=False), dtype=object)
    return pd.util.hash_array(values, categorize=False)


def _keyed(side: str, columns: dict[str, pa.Array], n: int, partitions: int, by_dataset: bool) -> pa.Table:
    h = _key_hash(columns["dataset"] if by_dataset else pa.nulls(n, pa.string()), columns["expression_id"])
    columns = dict(columns, side=pa.array([side] * n, pa.string()),
                   bucket=pa.array((h % np.uint64(partitions)).astype(np.int64)),
                   rank=pa.array(h.view(np.int64)))
    return pa.table([columns[f.name].cast(f.type) if f.name in columns else pa.nulls(n, f.type)
                     for f in KEYED_SCHEMA], schema=KEYED_SCHEMA)


def explode_ground_truth(batch: pa.Table, partitions: int, by_dataset: bool = True) -> pa.Table:
    """Task-shard rows (one per image) -> keyed ground-truth rows (one per expression)."""
    missing = [c for c in GT_COLUMNS if c not in batch.schema.names]
    if missing:
        raise ValueError(f"ground-truth task shards lack column(s) {missing}")
    exprs = batch.column("expressions").combine_chunks()
    parents = pc.list_parent_indices(exprs)
    flat = pc.list_flatten(exprs)
    cols = {c: batch.column(c).combine_chunks().take(parents) for c in ("image_id", "split", "dataset")}
    if SOURCE_COLUMN in batch.schema.names:  # the shard file, so the gallery reads only the files it shows
        cols["source"] = batch.column(SOURCE_COLUMN).combine_chunks().take(parents)
    for name, src in (("expression_id", "expression_id"), ("text", "text"), ("no_target", "no_target"),
                      ("gt_mask", "gt_mask"), ("gt_boxes", "gt_boxes")):
        cols[name] = pc.struct_field(flat, src)  # null where the whole struct is null
    if cols["expression_id"].null_count:
        first = cols["image_id"].filter(cols["expression_id"].is_null())[0].as_py()
        raise ValueError(f"ground truth of image {first!r} has an expression without expression_id")
    return _keyed("gt", cols, len(flat), partitions, by_dataset)


def key_predictions(batch: pa.Table, partitions: int, by_dataset: bool = True) -> pa.Table:
    """Prediction rows -> keyed rows (same schema as the ground truth's); a null or absent status is "ok"."""
    missing = [c for c in PREDICTION_REQUIRED + (["dataset"] if by_dataset else []) if c not in batch.schema.names]
    if missing:
        raise ValueError(f"predictions lack column(s) {missing}")
    cols = {c: batch.column(c).combine_chunks() for c in PREDICTION_REQUIRED + PREDICTION_OPTIONAL
            if c in batch.schema.names}
    status = cols.get("status", pa.nulls(batch.num_rows, pa.string()))
    cols["status"] = pc.fill_null(status.cast(pa.string()), STATUS_OK)
    cols.setdefault("dataset", pa.nulls(batch.num_rows, pa.string()))
    return _keyed("pred", cols, batch.num_rows, partitions, by_dataset)


def _match(gt: dict, pr: dict, counts: InputCounts, by_dataset: bool = True) -> tuple[np.ndarray, list[int | None]]:
    """Labelled ground-truth rows and, for each, its prediction row (None when missing).

    `gt` holds dataset, expression_id, labelled; `pr` dataset, expression_id, status (Python lists). A key
    predicted more than once keeps an "ok" row if it has one; the extra rows are counted. Without
    `by_dataset` the key is the expression id alone.
    """
    def keys(side: dict) -> list[tuple]:
        datasets = side["dataset"] if by_dataset else [""] * len(side["expression_id"])
        return list(zip(datasets, side["expression_id"]))

    gt_keys = keys(gt)
    if len(set(gt_keys)) != len(gt_keys):
        seen: set = set()
        dup = next(k for k in gt_keys if k in seen or seen.add(k))
        hint = "" if by_dataset else (" (predictions without a dataset column are matched on expression_id "
                                      "alone, so the ground truth must not repeat one across datasets)")
        raise ValueError(f"ground truth holds expression {dup[1]!r} of dataset {dup[0]!r} more than once{hint}")
    idx = np.flatnonzero(np.asarray(gt["labelled"], dtype=bool))
    counts.unlabelled = len(gt_keys) - len(idx)
    labelled = {gt_keys[k] for k in idx}
    chosen: dict[tuple, int] = {}
    unmatched: list[str] = []
    for j, key in enumerate(keys(pr)):
        if key not in labelled:
            unmatched.append(f"{key[0]}/{key[1]}")
        elif key in chosen:
            counts.duplicates += 1
            if pr["status"][chosen[key]] != STATUS_OK and pr["status"][j] == STATUS_OK:
                chosen[key] = j
        else:
            chosen[key] = j
    counts.without_ground_truth = len(unmatched)
    counts.without_ground_truth_examples = sorted(unmatched)[:EXAMPLES_KEPT]
    return idx, [chosen.get(gt_keys[k]) for k in idx]


def _inputs(gt: pa.Table, gt_mask: Masks, pred: pa.Table,
            counts: InputCounts) -> tuple[metrics.ExpressionInputs, list[str | None], np.ndarray]:
    """ExpressionInputs of aligned ground-truth / prediction rows (a null prediction row = missing), why each
    failed row failed ("missing", "error", "bad mask"), and which prediction masks are usable."""
    mask = Masks.from_arrow(pred.column("mask"))
    forced = Masks.from_arrow(pred.column("forced_mask"), same_as=(pred.column("mask"), mask))
    missing = pc.is_null(pred.column("side")).to_numpy(zero_copy_only=False)
    status_ok = pc.fill_null(pc.equal(pred.column("status"), STATUS_OK), False).to_numpy(zero_copy_only=False)
    same_size = (mask.height == gt_mask.height) & (mask.width == gt_mask.width)
    mask_ok = mask.usable() & same_size
    error = ~missing & ~status_ok
    bad = ~missing & status_ok & ~mask_ok
    reason = np.where(missing, "missing", np.where(error, "error", np.where(bad, "bad mask", ""))).tolist()
    counts.missing, counts.error_status, counts.bad_masks = int(missing.sum()), int(error.sum()), int(bad.sum())
    wrong_forced = forced.invalid | forced.usable() & (
        (forced.height != gt_mask.height) | (forced.width != gt_mask.width))
    counts.bad_forced_masks = int((wrong_forced & status_ok).sum())
    forced.drop(np.flatnonzero(wrong_forced))
    counts.scored = gt.num_rows
    inputs = metrics.ExpressionInputs(
        no_target=pc.fill_null(gt.column("no_target"), False).to_numpy(zero_copy_only=False).astype(bool),
        gt_mask=gt_mask, gt_box=enclosing_boxes(gt.column("gt_boxes")),
        failed=missing | error | bad,
        rejected=pc.fill_null(pred.column("rejected"), False).to_numpy(zero_copy_only=False).astype(bool),
        mask=mask, forced_mask=forced)
    return inputs, [r or None for r in reason], mask_ok


def score_bucket(batch: pa.Table, protocol: str, by: tuple[str, ...], per_kind: int,
                 by_dataset: bool = True) -> pa.Table:
    """All rows of one key bucket -> PARTIAL_SCHEMA rows: a ScoreStats per group, InputCounts, CaseBook."""
    side = batch.column("side")
    gt_at = np.flatnonzero(pc.equal(side, "gt").to_numpy(zero_copy_only=False))
    pr_at = np.flatnonzero(pc.equal(side, "pred").to_numpy(zero_copy_only=False))
    gt_keys = batch.select(["dataset", "expression_id", "no_target", "gt_mask"]).take(gt_at)
    pr_keys = batch.select(["dataset", "expression_id", "status", "model", "mode"]).take(pr_at)
    gt_mask = Masks.from_arrow(gt_keys.column("gt_mask"))  # validated once; an invalid one is not scored
    labelled = pc.is_valid(gt_keys.column("no_target")).to_numpy(zero_copy_only=False) & gt_mask.usable()
    gt = {**gt_keys.select(["dataset", "expression_id"]).to_pydict(), "labelled": labelled.tolist()}
    pr = pr_keys.select(["dataset", "expression_id", "status"]).to_pydict()
    counts = InputCounts(predictions_read=len(pr_at), ground_truth_expressions=len(gt_at),
                         bad_gt_masks=int(gt_mask.invalid.sum()),
                         models=sorted(set(pr_keys.column("model").to_pylist()) - {None}),
                         modes=sorted(set(pr_keys.column("mode").to_pylist()) - {None}))
    del gt_keys, pr_keys
    idx, match = _match(gt, pr, counts, by_dataset)
    # One take per side, of the columns scoring and the case book read (null rows where a prediction is missing).
    gt_rows = batch.select(GT_SCORED).take(pa.array(gt_at[idx], pa.int64()))
    pred = batch.select(PREDICTION_SCORED).take(
        pa.array([None if j is None else int(pr_at[j]) for j in match], pa.int64()))
    inputs, reason, mask_ok = _inputs(gt_rows, gt_mask.take(idx), pred, counts)
    scores = metrics.score_expressions(inputs, protocol)

    rows = [("inputs", None, json.dumps(counts.to_dict()))]
    parts = [pc.fill_null(gt_rows.column(c), "none") for c in by]
    names = np.asarray(pc.binary_join_element_wise(*parts, "/").to_numpy(zero_copy_only=False), dtype=object)
    for name in sorted(set(names)):
        stats = metrics.ScoreStats.from_scores(scores, rec_target=~inputs.no_target, select=names == name)
        rows.append(("stats", name, json.dumps(stats.to_dict())))
    decisions = [decision_label(r, bool(rej)) for r, rej in zip(reason, inputs.rejected)]
    shown = gt_rows.select(["dataset", "expression_id", "image_id", "split", "text", "gt_mask", "rank", "source"])
    usable_mask = pc.if_else(pa.array(mask_ok), pred.column("mask"), pa.nulls(pred.num_rows, RLE_TYPE))
    book = CaseBook.from_block(scores, shown.append_column("mask", usable_mask), decisions, per_kind)
    rows.append(("cases", None, json.dumps(book.to_dict())))
    return pa.table(list(map(list, zip(*rows))), schema=PARTIAL_SCHEMA)
