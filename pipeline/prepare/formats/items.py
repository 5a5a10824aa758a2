"""The one intermediate every source format produces: light per-image work items, plus skip accounting.

Why an intermediate: readers index the source (refs, annotations, manifest lines) on the driver, which is
cheap; rasterising masks and reading images is the expensive part, and it runs in parallel on workers
from these JSON-serialisable items (`to_task_row`). A `SkipReport` names every item that could not be
converted and why; reports from workers merge with `+`.

ImageItem (plain dict, JSON-serialisable):
    image_id: str, image_uri: str, width: int | None, height: int | None, split: str, dataset: str,
    annotations: {str(ann_id): {"segmentation": COCO segmentation, "bbox": [x, y, w, h] | None}},
    expressions: [{"expression_id": str, "text": str, "no_target": bool | None,
                   "ann_ids": list[int] | None}]   # None: ground truth unknown (manifests)
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline import masks

log = logging.getLogger(__name__)

ImageItem = dict[str, Any]


class SourceError(ValueError):
    """A source file that cannot be read as its format at all (as opposed to one bad item in it)."""


#: How many example messages a report keeps per reason (the counts are always complete).
EXAMPLES_PER_REASON = 5


@dataclass
class SkipReport:
    """What was skipped and why: per reason, how many items and expressions, and a few named examples."""

    items: Counter = field(default_factory=Counter)
    expressions: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, item: str, detail: str = "", expressions: int = 0) -> None:
        message = f"{item}: {detail}" if detail else item
        self.items[reason] += 1
        self.expressions[reason] += expressions
        kept = self.examples.setdefault(reason, [])
        if len(kept) < EXAMPLES_PER_REASON:  # beyond that, only counted: a wrong folder must not flood logs
            log.warning("skipped %s (%s)", message, reason)
            kept.append(message)

    def __add__(self, other: SkipReport) -> SkipReport:
        examples = {r: list(v) for r, v in self.examples.items()}
        for reason, more in other.examples.items():
            kept = examples.setdefault(reason, [])
            kept.extend(more[: max(0, EXAMPLES_PER_REASON - len(kept))])
        return SkipReport(self.items + other.items, self.expressions + other.expressions, examples)

    def total(self) -> int:
        return sum(self.items.values())

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {reason: {"items": self.items[reason], "expressions": self.expressions[reason],
                         "examples": self.examples.get(reason, [])} for reason in sorted(self.items)}

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]]) -> SkipReport:
        report = cls()
        for reason, entry in data.items():
            report.items[reason] = entry["items"]
            report.expressions[reason] = entry["expressions"]
            report.examples[reason] = list(entry["examples"])
        return report


def has_scheme(reference: str) -> bool:
    return "://" in reference


def resolve_within(root: str, relative: str) -> str:
    """`root` joined with `relative`, refusing absolute paths and `..` that would leave `root`.

    Raises ValueError naming the path. Works the same for local roots and URIs (s3://bucket/prefix).
    """
    if not relative or has_scheme(relative) or relative.startswith(("/", "\\")) or os.path.isabs(relative):
        raise ValueError(f"image path {relative!r} is not a path relative to the dataset root")
    parts = relative.replace("\\", "/").split("/")
    normal = posixpath.normpath("/".join(parts))
    if normal == ".." or normal.startswith("../") or normal == ".":
        raise ValueError(f"image path {relative!r} escapes the dataset root {root}")
    if has_scheme(root):
        return root.rstrip("/") + "/" + normal
    return os.path.join(os.path.abspath(root), *normal.split("/"))


def _rasterise(ann: dict[str, Any], height: int, width: int) -> masks.RLE:
    rle = masks.from_segmentation(ann["segmentation"], height, width)
    if [int(v) for v in rle["size"]] != [height, width]:
        raise ValueError(f"mask size {rle['size']} differs from the image's {[height, width]}")
    return rle


def to_task_row(item: ImageItem, image: bytes | None = None,
                skips: SkipReport | None = None) -> dict[str, Any] | None:
    """One ImageItem -> one TASK_SCHEMA row: union masks rasterised, boxes per target.

    An expression whose annotation cannot be rasterised is skipped (recorded in `skips`); None when no
    expression is left. `image`, when given, is embedded as is (the caller has validated it).
    """
    skips = skips if skips is not None else SkipReport()
    height, width = item.get("height"), item.get("width")
    rles: dict[str, masks.RLE] = {}
    bad: dict[str, str] = {}
    for key, ann in item.get("annotations", {}).items():
        try:
            rles[key] = _rasterise(ann, int(height), int(width))
        except Exception as exc:  # noqa: BLE001 - pycocotools raises bare exceptions on corrupt input
            bad[key] = f"{type(exc).__name__}: {exc}"
    expressions = []
    for expr in item["expressions"]:
        ann_ids = expr.get("ann_ids")
        where = f"expression {expr['expression_id']} (image {item['image_id']})"
        if ann_ids is None:
            gt_mask, gt_boxes = None, None
        else:
            broken = [str(a) for a in ann_ids if str(a) in bad]
            if broken:
                skips.add("corrupt annotation", where,
                          f"annotation {broken[0]} cannot be rasterised: {bad[broken[0]]}", expressions=1)
                continue
            targets = [rles[str(a)] for a in ann_ids]
            gt_mask = masks.union(targets, int(height), int(width))
            gt_boxes = []
            for a, rle in zip(ann_ids, targets):
                bbox = item["annotations"][str(a)].get("bbox")
                gt_boxes.append([float(v) for v in bbox] if bbox is not None else masks.to_bbox(rle))
        expressions.append({"expression_id": expr["expression_id"], "text": expr["text"],
                            "no_target": expr.get("no_target"), "gt_mask": gt_mask, "gt_boxes": gt_boxes})
    if not expressions:
        return None
    return {"image_id": item["image_id"], "image": image, "image_uri": item["image_uri"],
            "width": width, "height": height, "split": item["split"], "dataset": item["dataset"],
            "expressions": expressions}


def to_task_rows(items: list[ImageItem], skips: SkipReport | None = None) -> list[dict[str, Any]]:
    """Serial `to_task_row` over items (images referenced, not read): for small data and tests."""
    rows = (to_task_row(item, None, skips) for item in items)
    return [row for row in rows if row is not None]


def read_task_rows_with(read_items: Callable[..., list[ImageItem]], source: str,
                        **kwargs: Any) -> list[dict[str, Any]]:
    """Serial convenience behind every reader's `read_task_rows`: `read_items(source, ...)` -> task rows
    (images referenced, not opened), one SkipReport shared by both steps."""
    skips = kwargs.pop("skips", None)
    skips = skips if skips is not None else SkipReport()
    return to_task_rows(read_items(source, skips=skips, **kwargs), skips)
