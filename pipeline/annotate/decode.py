"""CPU stage: task rows -> decoded RGB pixels and checked expressions (DECODED_SCHEMA), one row per image.

Runs as plain Ray Data tasks ahead of the model replicas, so fetching and decoding images (PIL, network)
never occupies a GPU. Every failure is recorded on the row (`image_error`, or an expression's `error`)
and travels on: the model stage turns it into error rows, so no expression is ever dropped. Problems prepare
already found (the shard's image-level or expression-level `error`) are carried the same way, unread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from gsva.inputs import clean_expression
from pipeline.annotate.config import InputLimits
from pipeline.annotate.rows import DECODED_SCHEMA, SOURCE
from pipeline.images import ImageError, decode_image, read_image_bytes
from pipeline.schemas import TASK_OPTIONAL, TASK_SCHEMA, missing_columns
from pipeline.storage import StorageError, StorageOptions

#: The read adds this column (the shard's path inside its filesystem); it maps each row to its input key.
PATH_COLUMN = "path"


@dataclass(frozen=True)
class DecodeSpec:
    """What a decode task needs: input path -> key, limits, storage, and the model's reserved tokens."""

    keys: dict[str, str]
    limits: InputLimits
    storage: StorageOptions
    reserved_tokens: tuple[str, ...]


class DecodeStage:
    """`__call__(task rows) -> decoded rows`; stateless apart from the spec, so it runs as a Ray task."""

    def __init__(self, spec: DecodeSpec):
        self.spec = spec
        self._checked = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not self._checked:
            missing = missing_columns(batch.schema, pa.schema([*TASK_SCHEMA, pa.field(PATH_COLUMN, pa.string())]),
                                      TASK_OPTIONAL)
            if missing:
                raise ValueError(f"task shards lack the columns {missing}; write them with jobs.prepare")
            self._checked = True
        return pa.Table.from_pylist([self.decode_row(row) for row in batch.to_pylist()], schema=DECODED_SCHEMA)

    def decode_row(self, row: dict[str, Any]) -> dict[str, Any]:
        path = row[PATH_COLUMN]
        key = self.spec.keys.get(path) or self.spec.keys.get(path.lstrip("/"))
        if key is None:
            raise KeyError(f"row read from {path}, which is not one of the planned input files")
        out = {SOURCE: key, "image_id": row.get("image_id"), "dataset": row.get("dataset"),
               "split": row.get("split"), "pixels": None, "height": None, "width": None, "image_error": None,
               "expressions": [self.check_expression(e) for e in (row.get("expressions") or [])]}
        if row.get("error"):  # prepare could not use this image; its reason is the rows' error
            out["image_error"] = row["error"]
            return out
        try:
            pixels = self.load_pixels(row)
        except (ImageError, StorageError) as exc:
            out["image_error"] = str(exc)
            return out
        except Exception as exc:  # noqa: BLE001 - any other decoder failure is this image's problem only
            out["image_error"] = f"{_name(row)}: cannot decode image: {type(exc).__name__}: {exc}"
            return out
        out.update(pixels=pixels.tobytes(), height=pixels.shape[0], width=pixels.shape[1])
        return out

    def load_pixels(self, row: dict[str, Any]) -> np.ndarray:
        """RGB uint8 (H, W, 3) from the embedded bytes, else from `image_uri`."""
        data = row.get("image")
        if data is None:
            uri = row.get("image_uri")
            if not uri:
                raise ImageError(f"{_name(row)}: the task row has neither embedded image bytes nor an image_uri")
            data = read_image_bytes(uri, self.spec.storage, self.spec.limits.image.max_bytes)
        return decode_image(data, name=_name(row), limits=self.spec.limits.image)

    def check_expression(self, expression: dict[str, Any]) -> dict[str, Any]:
        clean = clean_expression(expression.get("text"), self.spec.limits.max_expression_chars,
                                 self.spec.reserved_tokens)
        error = expression.get("error") or clean.error
        if error is None and not expression.get("expression_id"):
            error = "expression has no expression_id"
        return {"expression_id": expression.get("expression_id"), "raw_text": expression.get("text"),
                "text": clean.text if error is None else None, "no_target": expression.get("no_target"),
                "error": error}


def _name(row: dict[str, Any]) -> str:
    return f"image {row.get('image_id')!r} ({row.get('image_uri') or 'embedded'})"
