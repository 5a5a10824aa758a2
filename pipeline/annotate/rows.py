"""The Arrow schemas that travel between annotate stages, and the builders of prediction rows.

Two schemas are internal to the job: DECODED_SCHEMA (decode stage -> model stage: one row per image with
raw RGB pixels and checked expressions) and PART_SCHEMA (model stage -> writer: PREDICTION_SCHEMA plus
three bookkeeping columns that never reach the final files).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipeline.schemas import PREDICTION_SCHEMA, STATUS_ERROR, STATUS_OK

#: Bookkeeping columns. `_source`: the input file's key; `_unit`: 1 on exactly one row per input image row
#: (the writer counts these to know when an input file is complete); `_pos`: the expression's position in
#: its image's list, -1 on the placeholder row of an image that has no expressions at all.
SOURCE, UNIT, POS = "_source", "_unit", "_pos"
INTERNAL_FIELDS = [pa.field(SOURCE, pa.string()), pa.field(UNIT, pa.int8()), pa.field(POS, pa.int32())]
PART_SCHEMA = pa.schema(list(PREDICTION_SCHEMA) + INTERNAL_FIELDS)

CHECKED_EXPRESSION_TYPE = pa.struct([
    ("expression_id", pa.string()),
    ("raw_text", pa.string()),  # as given; written back unchanged in the `text` column
    ("text", pa.string()),  # cleaned, what the model reads; null when `error` is set
    ("no_target", pa.bool_()),
    ("error", pa.string()),
])

DECODED_SCHEMA = pa.schema([
    (SOURCE, pa.string()),
    ("image_id", pa.string()),
    ("dataset", pa.string()),
    ("split", pa.string()),
    ("pixels", pa.large_binary()),  # H * W * 3 bytes of RGB uint8, row-major; null when image_error is set
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("image_error", pa.string()),
    ("expressions", pa.list_(CHECKED_EXPRESSION_TYPE)),
])


def base_row(image: dict[str, Any], expression: dict[str, Any] | None, pos: int, unit: bool,
             model: str, mode: str) -> dict[str, Any]:
    """The identity columns of one output row; the caller fills the outcome columns."""
    return {
        "expression_id": expression.get("expression_id") if expression else None,
        "image_id": image.get("image_id"),
        "dataset": image.get("dataset"),
        "split": image.get("split"),
        "text": expression.get("raw_text") if expression else None,
        "rejected": None, "mask": None, "forced_mask": None, "score": None, "answer": None,
        "status": STATUS_OK, "error": None, "model": model, "mode": mode, "note": None,
        SOURCE: image.get(SOURCE), UNIT: 1 if unit else 0, POS: pos,
    }


def error_row(image: dict[str, Any], expression: dict[str, Any] | None, pos: int, unit: bool,
              model: str, mode: str, error: str) -> dict[str, Any]:
    row = base_row(image, expression, pos, unit, model, mode)
    row.update(status=STATUS_ERROR, error=error)
    return row


def placeholder_row(image: dict[str, Any], model: str, mode: str) -> dict[str, Any]:
    """The single row of an image with no expressions: counted by the writer, dropped from the output."""
    return base_row(image, None, -1, True, model, mode)


def image_error_rows(image: dict[str, Any], model: str, mode: str, error: str) -> list[dict[str, Any]]:
    """One error row per expression of an image that cannot be used (or the placeholder if it has none)."""
    expressions = image.get("expressions") or []
    if not expressions:
        return [placeholder_row(image, model, mode)]
    return [error_row(image, e, i, i == 0, model, mode, error) for i, e in enumerate(expressions)]


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PART_SCHEMA)


def final_table(part: pa.Table) -> pa.Table:
    """Drop placeholder rows and bookkeeping columns: exactly PREDICTION_SCHEMA, one row per expression."""
    import pyarrow.compute as pc

    kept = part.filter(pc.greater_equal(part[POS], 0))
    return kept.select(PREDICTION_SCHEMA.names).cast(PREDICTION_SCHEMA)
