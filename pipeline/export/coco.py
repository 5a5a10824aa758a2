"""COCO results from prediction rows (pure): what `pycocotools.COCO.loadRes` reads against the source's own
instances.json, plus the images list of the task shards.

A results entry is one segmented expression: `image_id` as the source has it (an integer for the COCO-style
sources, whose task shards hold str(int); the manifest's string otherwise), `segmentation` (compressed RLE),
`score` (the [SEG] decision's probability), `expression_id` and `text`, and `category_id` 0: an expression
refers to a set of objects, not to one COCO category (loadRes indexes every result by a category_id; COCO's
own categories start at 1, so 0 never clashes). A rejected expression has no mask,
so it has no entry: COCO results list detections, not absences.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import IO, Any

from pipeline.prepare.formats import shapes
from pipeline.prepare.formats.sources import FORMATS as SOURCE_FORMATS
from pipeline.storage import filesystem

#: Datasets read from a COCO instances.json (gRefCOCO, the RefCOCO family, Shapes-GRES): integer image ids.
#: The category every results entry carries (see above).
EXPRESSION_CATEGORY_ID = 0
COCO_STYLE_DATASETS = frozenset({*(f for f in SOURCE_FORMATS if f not in ("manifest", "shapes")), shapes.DATASET})


def coco_image_id(image_id: str, dataset: str | None) -> int | str:
    """The image id as the source dataset spells it."""
    if dataset in COCO_STYLE_DATASETS and image_id.lstrip("-").isdigit():
        return int(image_id)
    return image_id


def result_entry(row: dict[str, Any]) -> dict[str, Any]:
    return {"image_id": coco_image_id(row["image_id"], row["dataset"]),
            "segmentation": {"size": list(row["mask"]["size"]), "counts": row["mask"]["counts"]},
            "score": float(row["score"]), "category_id": EXPRESSION_CATEGORY_ID,
            "expression_id": row["expression_id"], "text": row["text"]}


def image_entry(row: dict[str, Any]) -> dict[str, Any]:
    """One task row -> a COCO `images` entry (file name from the image URI; width/height as the shard has them)."""
    uri = row.get("image_uri") or ""
    return {"id": coco_image_id(row["image_id"], row["dataset"]), "file_name": uri.rsplit("/", 1)[-1] or None,
            "width": row.get("width"), "height": row.get("height"), "split": row.get("split"),
            "dataset": row.get("dataset")}


def write_json_list(entries: Iterable[dict[str, Any]], f: IO[str]) -> int:
    """Stream a JSON list, one entry per line, without holding it; how many entries were written."""
    count = 0
    f.write("[")
    for entry in entries:
        f.write(("\n" if count == 0 else ",\n") + json.dumps(entry, separators=(",", ":")))
        count += 1
    f.write("\n]\n")
    return count


def read_json_list(uri: str, storage=None) -> Iterator[dict[str, Any]]:
    """Read back a file written by write_json_list (the whole list: for tests and small files)."""
    fs, path = filesystem(uri, storage)
    with fs.open(path, "r") as f:
        yield from json.load(f)
