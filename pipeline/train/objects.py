"""The pretraining stages' ground truth: every COCO instance of an image, by image id, from ``instances.json``.

Task shards carry referring expressions, not objects; SAM's promptable segmentation and the LLaVA
descriptions need every object of an image (its mask, category, Shapes-GRES ``color`` and box). They come
from the dataset's own COCO annotation file (``--objects``), indexed and validated by the gRefCOCO reader's
``pipeline.prepare.formats.coco.index_instances`` (corrupt entries are left out and counted). Which images a stage
trains on is still decided by the task shards' split: the index is only looked up by their image ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import masks as rle
from pipeline.storage import StorageOptions


@dataclass(frozen=True)
class ImageObject:
    category: str
    attributes: dict[str, str]  # e.g. {"color": "red"} (the Shapes-GRES extra field); {} for plain COCO
    bbox: tuple[float, float, float, float]  # x, y, w, h
    segmentation: Any  # COCO polygons or RLE


ObjectIndex = dict[str, list[ImageObject]]
ATTRIBUTES = ("color",)


def load_objects(uri: str, storage: StorageOptions | None = None) -> tuple[ObjectIndex, int]:
    """-> ({image id: objects}, number of corrupt entries left out)."""
    from pipeline.prepare.formats.coco import index_instances
    from pipeline.prepare.formats.items import SkipReport
    from pipeline.storage import read_json

    instances = read_json(uri, storage)
    skips = SkipReport()
    index = index_instances(instances, skips, source=uri)
    names = {c.get("id"): c.get("name") for c in instances.get("categories") or [] if isinstance(c, dict)}
    out: ObjectIndex = {}
    for ann in index.anns.values():
        bbox = ann.get("bbox")
        img = index.images[ann["image_id"]]
        if bbox is None:
            bbox = rle.to_bbox(rle.from_segmentation(ann["segmentation"], img["height"], img["width"]))
        obj = ImageObject(category=str(names.get(ann.get("category_id"), ann.get("category_id"))),
                          attributes={k: str(ann[k]) for k in ATTRIBUTES if ann.get(k) is not None},
                          bbox=tuple(float(v) for v in bbox), segmentation=ann["segmentation"])
        out.setdefault(str(ann["image_id"]), []).append(obj)
    return out, skips.total() + len(index.bad_anns) + len(index.bad_images)


def object_masks(objects: list[ImageObject], height: int, width: int, keep_empty: bool = False) -> list[np.ndarray]:
    """Bool (H, W) masks of the objects; empty ones (nothing rasterised) are dropped unless ``keep_empty``
    (then the i-th mask is the i-th object's)."""
    masks = [rle.decode(rle.from_segmentation(o.segmentation, height, width)).astype(bool) for o in objects]
    return masks if keep_empty else [m for m in masks if m.any()]
