"""A picture of a finished annotate run: a few images with every expression's mask (gsva.overlay), written
next to the predictions so a person can see at a glance what the model did.

Reads only what it draws: the first predictions files, and from their task shards only the picked images' rows
(filter pushed down to the Parquet scan), decoded through pipeline.images.
"""

from __future__ import annotations

import pyarrow.compute as pc
import pyarrow.parquet as pq

from gsva.overlay import Shown, gallery_png
from pipeline import masks
from pipeline.annotate.layout import OutputLayout, completed
from pipeline.images import ImageError, decode_image, read_image_bytes
from pipeline.schemas import STATUS_OK
from pipeline.storage import StorageError, filesystem, join

GALLERY_FILE = "gallery.png"
GALLERY_IMAGES = 6
COLUMNS = 3


def write_gallery(layout: OutputLayout, images: int = GALLERY_IMAGES) -> str | None:
    """Draw the first `images` images of the finished input files (in key order) into OUTPUT/gallery.png;
    its URI, or None when no input file has finished."""
    done = completed(layout)
    if not done:
        return None
    fs, _ = layout.fs()
    panels: list = []
    for key in sorted(done):
        if len(panels) >= images:
            break
        with fs.open(layout.predictions(key), "rb") as f:
            predictions = pq.read_table(f)
        ids = list(dict.fromkeys(predictions["image_id"].to_pylist()))[: images - len(panels)]
        pixels = _images(done[key]["input"], ids, layout)
        for image_id in ids:
            rows = predictions.filter(pc.equal(predictions["image_id"], image_id)).to_pylist()
            title = f"image {image_id}" + ("" if image_id in pixels else " (image unreadable)")
            panels.append((pixels.get(image_id), [_shown(n, row) for n, row in enumerate(rows)], title))
    uri = join(layout.uri, GALLERY_FILE)
    out_fs, path = filesystem(uri, layout.options)
    with out_fs.open(path, "wb") as f:
        f.write(gallery_png(panels, COLUMNS))
    return uri


def _shown(n: int, row: dict) -> Shown:
    label = f"{n + 1}. \"{row['text']}\""
    if row["status"] != STATUS_OK or row["mask"] is None:
        return Shown(label, None, "error")
    return Shown(f"{label} p={row['score']:.2f}", None if row["rejected"] else masks.decode(row["mask"]))


def _images(task_uri: str, ids: list[str], layout: OutputLayout) -> dict:
    """image_id -> RGB pixels of the picked images of one task shard; unreadable ones are left out."""
    fs, path = filesystem(task_uri, layout.options)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=["image_id", "image", "image_uri"], filters=[("image_id", "in", ids)])
    out = {}
    for row in table.to_pylist():
        if row["image"] is None and not row["image_uri"]:
            continue
        try:
            data = row["image"] if row["image"] is not None else read_image_bytes(row["image_uri"], layout.options)
            out[row["image_id"]] = decode_image(data, name=str(row["image_id"]))
        except (ImageError, StorageError):
            continue
    return out
