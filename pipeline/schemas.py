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
    ]
)

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


def missing_columns(schema_or_names, required: pa.Schema) -> list[str]:
    """Names of `required`'s fields absent from a schema or a list of column names."""
    names = set(schema_or_names.names if isinstance(schema_or_names, pa.Schema) else schema_or_names)
    return [f.name for f in required if f.name not in names]
