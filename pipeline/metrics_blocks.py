"""Per-block work of the score job, pure pyarrow/numpy (no Ray): key both inputs, then score one bucket.

Ground truth (task shards, one row per image) and predictions (one row per expression) become rows of one
KEYED_SCHEMA, hashed on (dataset, expression_id) into buckets. `score_bucket` receives every row of a
bucket, joins them locally, scores each labelled expression from its RLEs and returns partial sums
(`ScoreStats` per group, `InputCounts`, `CaseBook`) as JSON rows, which `pipeline.scoring` adds up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import metrics
from pipeline.metrics_cases import CaseBook, decision_label
from pipeline.schemas import RLE_TYPE, STATUS_OK

KEY_SEPARATOR = "\x1f"
GT_COLUMNS = ["image_id", "split", "dataset", "expressions"]
SOURCE_COLUMN = "path"  # added by read_parquet(include_paths=True)
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


def _match(gt: dict, pr: dict, counts: InputCounts) -> tuple[list[int], list[int | None]]:
    """Labelled ground-truth rows and, for each, its prediction row (None when missing).

    A key predicted more than once keeps an "ok" row if it has one; the extra rows are counted.
    """
    gt_keys = list(zip(gt["dataset"], gt["expression_id"]))
    if len(set(gt_keys)) != len(gt_keys):
        seen: set = set()
        dup = next(k for k in gt_keys if k in seen or seen.add(k))
        raise ValueError(f"ground truth holds expression {dup[1]!r} of dataset {dup[0]!r} more than once")
    idx = [k for k in range(len(gt_keys)) if gt["no_target"][k] is not None and gt["gt_mask"][k] is not None]
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


def _inputs(gt: dict, pr: dict, idx: list[int], match: list[int | None], counts: InputCounts
            ) -> tuple[metrics.ExpressionInputs, list[str | None]]:
    """ExpressionInputs of the labelled rows, and why each failed one failed ("missing", "error", "bad mask")."""
    n = len(idx)
    reason: list[str | None] = [None] * n
    mask: list = [None] * n
    forced: list = [None] * n
    rejected = np.zeros(n, bool)
    for i, (k, j) in enumerate(zip(idx, match)):
        size = gt["gt_mask"][k]["size"]
        if j is None:
            reason[i], counts.missing = "missing", counts.missing + 1
        elif pr["status"][j] != STATUS_OK:
            reason[i], counts.error_status = "error", counts.error_status + 1
        elif pr["mask"][j] is None or pr["mask"][j]["size"] != size:
            reason[i], counts.bad_masks = "bad mask", counts.bad_masks + 1
        else:
            mask[i], rejected[i] = pr["mask"][j], bool(pr["rejected"][j])
            f = pr["forced_mask"][j]
            if f is not None and f["size"] != size:
                counts.bad_forced_masks += 1
                f = None
            forced[i] = f
    counts.scored = n
    inputs = metrics.ExpressionInputs(
        no_target=np.array([bool(gt["no_target"][k]) for k in idx], dtype=bool),
        gt_mask=[gt["gt_mask"][k] for k in idx], gt_boxes=[gt["gt_boxes"][k] for k in idx],
        failed=np.array([r is not None for r in reason], dtype=bool), rejected=rejected,
        mask=mask, forced_mask=forced)
    return inputs, reason


GT_FIELDS = ["dataset", "expression_id", "image_id", "split", "text", "no_target", "gt_mask", "gt_boxes", "rank",
             "source"]
PRED_FIELDS = ["dataset", "expression_id", "rejected", "mask", "forced_mask", "status", "model", "mode"]


def score_bucket(batch: pa.Table, protocol: str, by: tuple[str, ...], per_kind: int) -> pa.Table:
    """All rows of one key bucket -> PARTIAL_SCHEMA rows: a ScoreStats per group, InputCounts, CaseBook."""
    side = batch.column("side")
    gt = batch.filter(pc.equal(side, "gt")).select(GT_FIELDS).to_pydict()
    pr = batch.filter(pc.equal(side, "pred")).select(PRED_FIELDS).to_pydict()
    counts = InputCounts(predictions_read=len(pr["dataset"]), ground_truth_expressions=len(gt["dataset"]),
                         models=sorted(set(pr["model"]) - {None}), modes=sorted(set(pr["mode"]) - {None}))
    idx, match = _match(gt, pr, counts)
    inputs, reason = _inputs(gt, pr, idx, match, counts)
    scores = metrics.score_expressions(inputs, protocol)

    rows = [("inputs", None, json.dumps(counts.to_dict()))]
    names = np.array(["/".join(str(gt[c][k]) if gt[c][k] is not None else "none" for c in by) for k in idx],
                     dtype=object)
    for name in sorted(set(names)):
        stats = metrics.ScoreStats.from_scores(scores, rec_target=~inputs.no_target, select=names == name)
        rows.append(("stats", name, json.dumps(stats.to_dict())))
    case_rows = {c: [gt[c][k] for k in idx] for c in ("dataset", "expression_id", "image_id", "split", "text",
                                                        "gt_mask", "rank", "source")}
    case_rows["mask"] = inputs.mask
    case_rows["decision"] = [decision_label(r, bool(rej)) for r, rej in zip(reason, inputs.rejected)]
    book = CaseBook.from_block(scores, case_rows, per_kind=per_kind)
    rows.append(("cases", None, json.dumps(book.to_dict())))
    return pa.table(list(map(list, zip(*rows))), schema=PARTIAL_SCHEMA)
