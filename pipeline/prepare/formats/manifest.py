"""A user's own manifest (JSONL, CSV or Parquet) of `image` + `expression` (+ optional `id`) -> ImageItems.

For annotation without ground truth: `no_target`, `gt_mask`, `gt_boxes` are null, and so are `width` and
`height` unless prepare embeds (and therefore opens) the images. `image` is a URI (s3://, file://), an
absolute path, or a path relative to the manifest's folder whose real path (symbolic links resolved) must
stay inside the folder's real path. Rows of one image become one task row (expressions grouped by image, in
manifest order). Without an `id` column an expression's id is derived from its content (image + text), so
it is stable when the manifest is re-sorted or extended.

Every row becomes exactly one expression of the shards, and so one prediction row: a row without an image
reference, with an image path leaving the folder, or with an empty expression is *flagged* (kept with its
reason in `error`; see `items.flag`), never dropped. The one exception is a row repeating an earlier row's
expression id, which is skipped and reported (an output cannot hold two rows of one id).
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
from typing import Any

from pipeline.prepare.formats.items import (
    ESCAPES_ROOT,
    ImageItem,
    SkipReport,
    SourceError,
    flag,
    has_scheme,
    read_task_rows_with,
    resolve_within,
)
from pipeline.storage import StorageOptions, filesystem

IMAGE_COLUMN = "image"
TEXT_COLUMN = "expression"
ID_COLUMN = "id"
SPLIT = "all"  # manifests carry no split
#: Hex digits of the content hash used as expression id (48 bits: collisions need ~16M expressions).
ID_HEX_DIGITS = 12


def read_records(uri: str, storage: StorageOptions | None = None) -> list[dict[str, Any]]:
    """The manifest's rows as dicts, by extension: .jsonl/.json (JSON lines), .csv, .parquet."""
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    fs, path = filesystem(uri, storage)
    ext = os.path.splitext(path)[1].lower()
    readers = {".jsonl": pa_json.read_json, ".json": pa_json.read_json, ".ndjson": pa_json.read_json,
               ".csv": lambda f: pa_csv.read_csv(
                   f, convert_options=pa_csv.ConvertOptions(strings_can_be_null=True,
                                                            column_types={ID_COLUMN: "string"})),
               ".parquet": pq.read_table}
    if ext not in readers:
        raise SourceError(f"manifest {uri}: unsupported extension {ext!r}; use .jsonl, .csv or .parquet")
    with fs.open(path, "rb") as f:
        data = io.BytesIO(f.read())
    try:
        table = readers[ext](data)
    except Exception as exc:  # pyarrow raises ArrowInvalid naming the line
        raise SourceError(f"manifest {uri} cannot be parsed: {exc}") from exc
    missing = [c for c in (IMAGE_COLUMN, TEXT_COLUMN) if c not in table.column_names]
    if missing:
        raise SourceError(f"manifest {uri} lacks column(s) {missing}; it has {table.column_names}")
    return table.to_pylist()


def manifest_dir(uri: str) -> str:
    if has_scheme(uri):
        return uri.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(uri))


def _resolve(image: str, base: str) -> str:
    if has_scheme(image) or os.path.isabs(image):
        return image
    return resolve_within(base, image)


def _expression_id(image: str, text: str) -> str:
    return hashlib.sha1(f"{image}\n{text}".encode()).hexdigest()[:ID_HEX_DIGITS]


def _item(image: str | None, uri: str | None, dataset: str) -> ImageItem:
    return {"image_id": image, "image_uri": uri, "width": None, "height": None, "split": SPLIT,
            "dataset": dataset, "annotations": {}, "expressions": []}


def _image_item(image: str, base: str, dataset: str, where: str) -> ImageItem:
    """The item of a referenced image; flagged (and never read) when its path leaves the manifest's folder."""
    try:
        return _item(image, _resolve(image, base), dataset)
    except ValueError as exc:
        return flag(_item(image, None, dataset), ESCAPES_ROOT, f"{where}: {exc}")


def load_items(records: list[dict[str, Any]], *, base: str, dataset: str,
               skips: SkipReport | None = None) -> list[ImageItem]:
    """Manifest rows -> ImageItems (pure), one expression per row. `base` is the folder relative image paths
    are resolved in. Bad rows are flagged, not dropped; only a repeated expression id is skipped."""
    skips = skips if skips is not None else SkipReport()
    items: dict[str | tuple[int], ImageItem] = {}
    seen: set[str] = set()
    for line, rec in enumerate(records):
        where = f"manifest row {line}"
        image, text, given = rec.get(IMAGE_COLUMN), rec.get(TEXT_COLUMN), rec.get(ID_COLUMN)
        image = image.strip() if isinstance(image, str) and image.strip() else None
        clean = text.strip() if isinstance(text, str) and text.strip() else None
        raw = None if text is None else str(text)
        # A bad row's derived id includes its row number: two empty rows of one image stay two rows.
        expression_id = str(given) if given is not None else \
            _expression_id(image or "", clean if clean is not None and image else f"{raw}\n#row {line}")
        if expression_id in seen:
            skips.add("duplicate expression id", f"{where} (image {image})", f"id {expression_id}",
                      expressions=1)
            continue
        seen.add(expression_id)
        expression = {"expression_id": expression_id, "text": clean if clean is not None else raw,
                      "no_target": None, "ann_ids": None}
        if image is None:  # nothing to group by: a task row of its own
            item = items[(line,)] = flag(_item(None, None, dataset), "missing image reference",
                                         f"{where}: no image reference (image is {rec.get(IMAGE_COLUMN)!r})")
        else:
            item = items.get(image) or items.setdefault(image, _image_item(image, base, dataset, where))
            if clean is None:
                flag(expression, "empty sentence", f"{where}: the expression is empty (text {raw!r})")
        item["expressions"].append(expression)
    return list(items.values())


def dataset_name(uri: str) -> str:
    """The manifest's file name without extension: the `dataset` column of its task rows."""
    return posixpath.splitext(posixpath.basename(uri.rstrip("/")))[0] or "manifest"


def read_items(uri: str, *, storage: StorageOptions | None = None,
               skips: SkipReport | None = None) -> list[ImageItem]:
    return load_items(read_records(uri, storage), base=manifest_dir(uri), dataset=dataset_name(uri),
                      skips=skips)


def read_task_rows(uri: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Serial convenience: the task rows of a manifest, images referenced and not opened."""
    return read_task_rows_with(read_items, uri, **kwargs)
