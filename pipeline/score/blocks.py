"""Per-block work of the score job, pure pyarrow/numpy (no Ray): key both inputs, then score one bucket.

Ground truth (task shards, one row per image) and predictions (one row per expression) become rows of one
KEYED_SCHEMA, hashed on (dataset, expression_id) into buckets. `score_bucket` receives every row of a
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
PREDICTION_REQUIRED = ["expression_id", "dataset", "rejected", "mask", "status"]
PREDICTION_OPTIONAL = ["image_id", "split", "text", "forced_mask", "model", "mode"]
EXAMPLES_KEPT = 5  # unmatched prediction keys quoted in the report
KEYED_SCHEMA = pa.schema([
    ("side", pa.string()), ("bucket", pa.int64()), ("rank", pa.int64()), ("source", pa.string()),
    ("dataset", pa.string()), ("expression_id", pa.string()), ("image_id", pa.string()),
    ("split", pa.string()), ("text", pa.string()),
    ("no_target", pa.bool_()), ("gt_mask", RLE_TYPE), ("gt_boxes", pa.list_(pa.list_(pa.float64()))),
    ("rejected", pa.bool_()), ("mask", RLE_TYPE), ("forced_mask", RLE_TYPE), ("status", pa.string()),
    ("model", pa.string()), ("mode", pa.string()),
])
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
    bad_masks: int = 0  # status ok but mask null or of another size than the ground truth
    bad_forced_masks: int = 0  # forced_mask of another size: ignored
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


def _keyed(side: str, columns: dict[str, pa.Array], n: int, partitions: int) -> pa.Table:
    h = _key_hash(columns["dataset"], columns["expression_id"])
    columns = dict(columns, side=pa.array([side] * n, pa.string()),
                   bucket=pa.array((h % np.uint64(partitions)).astype(np.int64)),
                   rank=pa.array(h.view(np.int64)))
    return pa.table([columns[f.name].cast(f.type) if f.name in columns else pa.nulls(n, f.type)
                     for f in KEYED_SCHEMA], schema=KEYED_SCHEMA)


def explode_ground_truth(batch: pa.Table, partitions: int) -> pa.Table:
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
    return _keyed("gt", cols, len(flat), partitions)


def key_predictions(batch: pa.Table, partitions: int) -> pa.Table:
    """Prediction rows -> keyed rows (same schema as the ground truth's)."""
    missing = [c for c in PREDICTION_REQUIRED if c not in batch.schema.names]
    if missing:
        raise ValueError(f"predictions lack column(s) {missing}")
    cols = {c: batch.column(c).combine_chunks() for c in PREDICTION_REQUIRED + PREDICTION_OPTIONAL
            if c in batch.schema.names}
    return _keyed("pred", cols, batch.num_rows, partitions)


def _match(gt: dict, pr: dict, counts: InputCounts) -> tuple[np.ndarray, list[int | None]]:
    """Labelled ground-truth rows and, for each, its prediction row (None when missing).

    `gt` holds dataset, expression_id, labelled; `pr` dataset, expression_id, status (Python lists). A key
    predicted more than once keeps an "ok" row if it has one; the extra rows are counted.
    """
    gt_keys = list(zip(gt["dataset"], gt["expression_id"]))
    if len(set(gt_keys)) != len(gt_keys):
        seen: set = set()
        dup = next(k for k in gt_keys if k in seen or seen.add(k))
        raise ValueError(f"ground truth holds expression {dup[1]!r} of dataset {dup[0]!r} more than once")
    idx = np.flatnonzero(np.asarray(gt["labelled"], dtype=bool))
    counts.unlabelled = len(gt_keys) - len(idx)
    labelled = {gt_keys[k] for k in idx}
    chosen: dict[tuple, int] = {}
    unmatched: list[str] = []
    for j, key in enumerate(zip(pr["dataset"], pr["expression_id"])):
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


def _inputs(gt: pa.Table, pred: pa.Table, counts: InputCounts) -> tuple[metrics.ExpressionInputs, list[str | None]]:
    """ExpressionInputs of aligned ground-truth / prediction rows (a null prediction row = missing), and why
    each failed row failed ("missing", "error", "bad mask")."""
    gt_mask = Masks.from_arrow(gt.column("gt_mask"))
    mask = Masks.from_arrow(pred.column("mask"))
    forced = Masks.from_arrow(pred.column("forced_mask"))
    missing = pc.is_null(pred.column("side")).to_numpy(zero_copy_only=False)
    status_ok = pc.fill_null(pc.equal(pred.column("status"), STATUS_OK), False).to_numpy(zero_copy_only=False)
    same_size = (mask.height == gt_mask.height) & (mask.width == gt_mask.width)
    mask_ok = np.array([c is not None for c in mask.counts], dtype=bool) & same_size
    error = ~missing & ~status_ok
    bad = ~missing & status_ok & ~mask_ok
    reason = np.where(missing, "missing", np.where(error, "error", np.where(bad, "bad mask", ""))).tolist()
    counts.missing, counts.error_status, counts.bad_masks = int(missing.sum()), int(error.sum()), int(bad.sum())
    wrong_forced = np.array([c is not None for c in forced.counts], dtype=bool) & (
        (forced.height != gt_mask.height) | (forced.width != gt_mask.width))
    counts.bad_forced_masks = int((wrong_forced & status_ok).sum())
    for k in np.flatnonzero(wrong_forced):
        forced.counts[k] = None
    counts.scored = gt.num_rows
    inputs = metrics.ExpressionInputs(
        no_target=pc.fill_null(gt.column("no_target"), False).to_numpy(zero_copy_only=False).astype(bool),
        gt_mask=gt_mask, gt_box=enclosing_boxes(gt.column("gt_boxes")),
        failed=missing | error | bad,
        rejected=pc.fill_null(pred.column("rejected"), False).to_numpy(zero_copy_only=False).astype(bool),
        mask=mask, forced_mask=forced)
    return inputs, [r or None for r in reason]


def score_bucket(batch: pa.Table, protocol: str, by: tuple[str, ...], per_kind: int) -> pa.Table:
    """All rows of one key bucket -> PARTIAL_SCHEMA rows: a ScoreStats per group, InputCounts, CaseBook."""
    side = batch.column("side")
    gt_rows = batch.filter(pc.equal(side, "gt"))
    pr_rows = batch.filter(pc.equal(side, "pred"))
    labelled = pc.and_(pc.is_valid(gt_rows.column("no_target")), pc.is_valid(gt_rows.column("gt_mask")))
    gt = {**gt_rows.select(["dataset", "expression_id"]).to_pydict(), "labelled": labelled.to_pylist()}
    pr = pr_rows.select(["dataset", "expression_id", "status"]).to_pydict()
    counts = InputCounts(predictions_read=pr_rows.num_rows, ground_truth_expressions=gt_rows.num_rows,
                         models=sorted(set(pr_rows.column("model").to_pylist()) - {None}),
                         modes=sorted(set(pr_rows.column("mode").to_pylist()) - {None}))
    idx, match = _match(gt, pr, counts)
    gt_rows = gt_rows.take(pa.array(idx, pa.int64()))
    pred = pr_rows.take(pa.array(match, pa.int64()))  # null rows where missing
    inputs, reason = _inputs(gt_rows, pred, counts)
    scores = metrics.score_expressions(inputs, protocol)

    rows = [("inputs", None, json.dumps(counts.to_dict()))]
    parts = [pc.fill_null(gt_rows.column(c), "none") for c in by]
    names = np.asarray(pc.binary_join_element_wise(*parts, "/").to_numpy(zero_copy_only=False), dtype=object)
    for name in sorted(set(names)):
        stats = metrics.ScoreStats.from_scores(scores, rec_target=~inputs.no_target, select=names == name)
        rows.append(("stats", name, json.dumps(stats.to_dict())))
    decisions = [decision_label(r, bool(rej)) for r, rej in zip(reason, inputs.rejected)]
    shown = gt_rows.select(["dataset", "expression_id", "image_id", "split", "text", "gt_mask", "rank", "source"])
    book = CaseBook.from_block(scores, shown.append_column("mask", pred.column("mask")), decisions, per_kind)
    rows.append(("cases", None, json.dumps(book.to_dict())))
    return pa.table(list(map(list, zip(*rows))), schema=PARTIAL_SCHEMA)
