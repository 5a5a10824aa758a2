"""The one intermediate every source format produces: light per-image work items, plus skip accounting.

Why an intermediate: readers index the source (refs, annotations, manifest lines) on the driver, which is
cheap; rasterising masks and reading images is the expensive part, and it runs in parallel on workers
from these JSON-serialisable items (`to_task_row`). A `SkipReport` names every item that could not be
converted and why; reports from workers merge with `+`.

Skipped or flagged: an item whose image cannot be used (missing, not a regular file, escaping the root, not
an image...) and a manifest expression that cannot be annotated (empty) are *flagged* (`flag`): they stay in
the shards with their reason in the `error` column, so annotate writes one `status=error` row for each and
no input row is lost. Only what cannot become a row at all is *skipped* (a ground truth that cannot be
rasterised, a duplicate expression id, a ref without sentences).

ImageItem (plain dict, JSON-serialisable):
    image_id: str | None, image_uri: str | None, width: int | None, height: int | None, split: str,
    dataset: str, annotations: {str(ann_id): {"segmentation": COCO segmentation, "bbox": [x, y, w, h] | None}},
    expressions: [{"expression_id": str, "text": str, "no_target": bool | None,
                   "ann_ids": list[int] | None,   # None: ground truth unknown (manifests)
                   "error": str | None, "error_reason": str | None}],   # flagged expression
    error: str | None, error_reason: str | None   # flagged image: message (stored) and category (counted)
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
from pipeline.storage import filesystem, is_local

log = logging.getLogger(__name__)

ImageItem = dict[str, Any]


class SourceError(ValueError):
    """A source file that cannot be read as its format at all (as opposed to one bad item in it)."""


#: How many example messages a report keeps per reason (the counts are always complete).
EXAMPLES_PER_REASON = 5


@dataclass
class SkipReport:
    """What was skipped (or, with action "flagged", kept as error rows) and why: per reason, how many items and
    expressions, and a few named examples."""

    items: Counter = field(default_factory=Counter)
    expressions: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    action: str = "skipped"  # the log's verb: "skipped", or "flagged" for items carried as error rows

    def add(self, reason: str, item: str, detail: str = "", expressions: int = 0) -> None:
        message = f"{item}: {detail}" if detail else item
        self.items[reason] += 1
        self.expressions[reason] += expressions
        kept = self.examples.setdefault(reason, [])
        if len(kept) < EXAMPLES_PER_REASON:  # beyond that, only counted: a wrong folder must not flood logs
            log.warning("%s %s (%s)", self.action, message, reason)
            kept.append(message)

    def __add__(self, other: SkipReport) -> SkipReport:
        examples = {r: list(v) for r, v in self.examples.items()}
        for reason, more in other.examples.items():
            kept = examples.setdefault(reason, [])
            kept.extend(more[: max(0, EXAMPLES_PER_REASON - len(kept))])
        return SkipReport(self.items + other.items, self.expressions + other.expressions, examples, self.action)

    def total(self) -> int:
        return sum(self.items.values())

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {reason: {"items": self.items[reason], "expressions": self.expressions[reason],
                         "examples": self.examples.get(reason, [])} for reason in sorted(self.items)}

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]], action: str = "skipped") -> SkipReport:
        report = cls(action=action)
        for reason, entry in data.items():
            report.items[reason] = entry["items"]
            report.expressions[reason] = entry["expressions"]
            report.examples[reason] = list(entry["examples"])
        return report


def has_scheme(reference: str) -> bool:
    return "://" in reference


#: Reason of a path refused by `resolve_within` (a flagged item's category).
ESCAPES_ROOT = "image path escapes root"


def flag(target: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    """Mark an ImageItem or expression as unusable: `message` is stored in its `error`, `reason` counted."""
    target["error"], target["error_reason"] = message, reason
    return target


def resolve_within(root: str, relative: str) -> str:
    """`root` joined with `relative`, refusing absolute paths and paths that leave `root`.

    Local roots (paths, file://): the *real* path decides, so `..` and symbolic links (of the file or of any
    folder below the root) that lead outside the root's real path are refused; the root itself may be a
    link. The real path is returned, so the file later read is the file checked here. Object stores
    (s3://) have no links: `..` is refused in the key. Raises ValueError naming the path.
    """
    if not relative or has_scheme(relative) or relative.startswith(("/", "\\")) or os.path.isabs(relative):
        raise ValueError(f"image path {relative!r} is not a path relative to the dataset root")
    parts = relative.replace("\\", "/").split("/")
    normal = posixpath.normpath("/".join(parts))
    if normal == ".." or normal.startswith("../") or normal == ".":
        raise ValueError(f"image path {relative!r} escapes the dataset root {root}")
    if not is_local(root):
        return root.rstrip("/") + "/" + normal
    local_root = os.path.abspath(filesystem(root)[1])
    real_root = os.path.realpath(local_root)
    real = os.path.realpath(os.path.join(local_root, *normal.split("/")))
    if os.path.commonpath([real_root, real]) != real_root:
        raise ValueError(f"image path {relative!r} escapes the dataset root {root}: it resolves to {real}, "
                         f"outside {real_root} (a symbolic link leaves the root)")
    return f"file://{real}" if has_scheme(root) else real


def _rasterise(ann: dict[str, Any], height: int, width: int) -> masks.RLE:
    rle = masks.from_segmentation(ann["segmentation"], height, width)
    if [int(v) for v in rle["size"]] != [height, width]:
        raise ValueError(f"mask size {rle['size']} differs from the image's {[height, width]}")
    return rle


def to_task_row(item: ImageItem, image: bytes | None = None,
                skips: SkipReport | None = None) -> dict[str, Any] | None:
    """One ImageItem -> one TASK_SCHEMA row: union masks rasterised, boxes per target.

    An expression whose annotation cannot be rasterised is skipped (recorded in `skips`); None when no
    expression is left. `image`, when given, is embedded as is (the caller has validated it). The item's and
    expressions' `error` (see `flag`) are written to the row's `error` columns.
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
                            "no_target": expr.get("no_target"), "gt_mask": gt_mask, "gt_boxes": gt_boxes,
                            "error": expr.get("error")})
    if not expressions:
        return None
    return {"image_id": item["image_id"], "image": image, "image_uri": item["image_uri"],
            "width": width, "height": height, "split": item["split"], "dataset": item["dataset"],
            "expressions": expressions, "error": item.get("error")}


def flagged_report(item: ImageItem, row: dict[str, Any] | None, flagged: SkipReport) -> None:
    """Count what `row` (the item's written task row) carries flagged: the image, or each flagged expression."""
    if row is None:
        return
    where = f"image {item['image_id']} ({item.get('image_uri')})"
    if item.get("error"):
        flagged.add(item.get("error_reason") or "unusable image", where, item["error"],
                    expressions=len(row["expressions"]))
        return
    written = {e["expression_id"] for e in row["expressions"]}
    for expr in item["expressions"]:
        if expr.get("error") and expr["expression_id"] in written:
            flagged.add(expr.get("error_reason") or "unusable expression",
                        f"expression {expr['expression_id']} ({where})", expr["error"], expressions=1)


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
