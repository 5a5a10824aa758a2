"""The two canonical Parquet schemas: task shards (one row per image) and predictions (one row per expression).

Every writer in the project writes exactly these schemas, so readers never guess types.
"""

from __future__ import annotations

import pyarrow as pa

#: COCO compressed RLE, as a struct: size = [height, width], counts = the compressed string.
RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

EXPRESSION_TYPE = pa.struct(
    [
        ("expression_id", pa.string()),  # unique within a dataset (gRefCOCO/RefCOCO: the sent_id)
        ("text", pa.string()),
        ("no_target", pa.bool_()),  # null when unknown (annotation without ground truth)
        ("gt_mask", RLE_TYPE),  # union of the targets' masks; empty for no-target; null when unknown
        ("gt_boxes", pa.list_(pa.list_(pa.float64()))),  # per target [x, y, w, h]; null when unknown
        ("error", pa.string()),  # why this expression cannot be annotated (e.g. empty); null when fine
    ]
)

TASK_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image", pa.binary()),  # encoded image bytes; null when referenced by image_uri
        ("image_uri", pa.string()),
        ("width", pa.int32()),  # null when the image was not opened (manifests)
        ("height", pa.int32()),
        ("split", pa.string()),
        ("dataset", pa.string()),
        ("expressions", pa.list_(EXPRESSION_TYPE)),
        ("error", pa.string()),  # why the image cannot be used (missing, not a regular file, ...); null when fine
    ]
)
#: Columns (and expression fields) added after the first release: shards without them read as all-null.
TASK_OPTIONAL = ("error",)

PREDICTION_SCHEMA = pa.schema(
    [
        ("expression_id", pa.string()),
        ("image_id", pa.string()),
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("text", pa.string()),
        ("rejected", pa.bool_()),
        ("mask", RLE_TYPE),  # at the original image size; empty when rejected; null on error
        ("forced_mask", RLE_TYPE),  # teacher-forced mode: the REJ->SEG re-run's mask; else null
        ("score", pa.float32()),  # probability of the chosen decision token
        ("answer", pa.string()),  # the (generated or forced) answer text of the conversation
        ("status", pa.string()),  # "ok" | "error"
        ("error", pa.string()),  # null when ok
        ("model", pa.string()),  # checkpoint identity
        ("mode", pa.string()),  # "generate" | "teacher-forced"
        ("note", pa.string()),  # remark on an ok row, e.g. no [SEG]/[REJ] generated (treated as rejected)
    ]
)

STATUS_OK = "ok"
STATUS_ERROR = "error"


def missing_columns(schema_or_names, required: pa.Schema, optional: tuple[str, ...] = ()) -> list[str]:
    """Names of `required`'s fields absent from a schema or a list of column names (`optional` ones may be)."""
    names = set(schema_or_names.names if isinstance(schema_or_names, pa.Schema) else schema_or_names)
    return [f.name for f in required if f.name not in names and f.name not in optional]


def _family(t: pa.DataType) -> str | None:
    """Types that cast into each other without changing meaning share a family."""
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    if pa.types.is_integer(t):
        return "integer"  # the cast checks the range
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_boolean(t):
        return "bool"
    return None


def _type_problem(actual: pa.DataType, expected: pa.DataType, optional: tuple[str, ...]) -> str | None:
    if actual.equals(expected) or pa.types.is_null(actual):
        return None
    if pa.types.is_struct(expected):
        if not pa.types.is_struct(actual):
            return "not a struct"
        names = [actual.field(i).name for i in range(actual.num_fields)]
        for f in expected:
            if f.name not in names:
                if f.name not in optional:
                    return f"lacks field {f.name!r}"
                continue
            inner = _type_problem(actual.field(f.name).type, f.type, optional)
            if inner is not None:
                return f"field {f.name!r}: {inner}"
        return None
    if pa.types.is_list(expected):
        if not (pa.types.is_list(actual) or pa.types.is_large_list(actual)):
            return "not a list"
        inner = _type_problem(actual.value_type, expected.value_type, optional)
        return None if inner is None else f"list items: {inner}"
    family = _family(expected)
    return None if family is not None and family == _family(actual) else "wrong type"


def type_problems(schema: pa.Schema, expected: pa.Schema, optional: tuple[str, ...] = ()) -> list[str]:
    """`column: actual (expected type)` for every column of `schema` whose type cannot stand for the expected
    one. Compatible: equal types, string/large_string, binary/large_binary, integer widths, float widths,
    lists of compatible items, structs whose fields are compatible (`optional` fields may be absent)."""
    problems = []
    for f in expected:
        if f.name in schema.names:
            actual = schema.field(f.name).type
            if _type_problem(actual, f.type, optional) is not None:
                problems.append(f"{f.name}: {actual} (expected {f.type})")
    return problems
