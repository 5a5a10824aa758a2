"""COCO `instances.json` indexing and refs -> ImageItems, shared by the gRefCOCO and RefCOCO readers.

Both families are "refs" (one referred object set + its sentences) over a COCO annotation file; they differ
only in how a ref names its targets, which each reader normalises before calling `refs_to_items`:
    {"ref_id", "image_id", "split", "ann_ids": list[int] ([] for no-target), "sentences": [...]}.
Corrupt entries are found here, structurally, so a worker never meets them; a ref that touches one is
skipped with the entry named.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.prepare.formats.items import ESCAPES_ROOT, ImageItem, SkipReport, SourceError, flag, resolve_within


@dataclass
class CocoIndex:
    """Valid image and annotation entries by id, and the reason for each corrupt one."""

    images: dict[int, dict[str, Any]]
    anns: dict[int, dict[str, Any]]
    bad_images: dict[int, str]
    bad_anns: dict[int, str]


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def segmentation_problem(seg: Any, height: int, width: int) -> str | None:
    """Why a COCO segmentation is structurally unusable (None when it is fine)."""
    if isinstance(seg, list):
        for poly in seg:
            if not isinstance(poly, list) or not all(is_number(v) for v in poly):
                return "polygon is not a list of numbers"
            if len(poly) % 2:
                return f"polygon has an odd number of coordinates ({len(poly)})"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not isinstance(size, list) or len(size) != 2 or not all(is_int(v) for v in size):
            return f"RLE size {size!r} is not [height, width]"
        if [int(size[0]), int(size[1])] != [height, width]:
            return f"RLE size {size} differs from the image's [{height}, {width}]"
        if isinstance(counts, list):
            if not all(is_int(v) and v >= 0 for v in counts) or sum(counts) != height * width:
                return "uncompressed RLE counts do not cover the image"
            return None
        if not isinstance(counts, (str, bytes)) or not counts:
            return "RLE counts missing"
        return None
    return f"segmentation of type {type(seg).__name__}"


def index_instances(instances: Any, skips: SkipReport, source: str = "instances.json") -> CocoIndex:
    """Index `images` and `annotations`; entries without a usable id are counted as skipped at once."""
    if not isinstance(instances, dict) or not isinstance(instances.get("images"), list) \
            or not isinstance(instances.get("annotations"), list):
        raise SourceError(f"{source} is not a COCO annotation file (needs 'images' and 'annotations' lists)")
    index = CocoIndex({}, {}, {}, {})
    for pos, img in enumerate(instances["images"]):
        if not isinstance(img, dict) or not is_int(img.get("id")):
            skips.add("corrupt image entry", f"{source} images[{pos}]", "no integer id")
            continue
        w, h, name = img.get("width"), img.get("height"), img.get("file_name")
        if not (is_int(w) and is_int(h) and w > 0 and h > 0) or not isinstance(name, str) or not name:
            index.bad_images[img["id"]] = f"image entry {img['id']} lacks file_name/width/height"
        else:
            index.images[img["id"]] = img
    for pos, ann in enumerate(instances["annotations"]):
        if not isinstance(ann, dict) or not is_int(ann.get("id")):
            skips.add("corrupt annotation entry", f"{source} annotations[{pos}]", "no integer id")
            continue
        index.anns[ann["id"]] = ann
    for ann_id, ann in list(index.anns.items()):
        img = index.images.get(ann.get("image_id"))
        problem = "image_id names no valid image" if img is None else \
            segmentation_problem(ann.get("segmentation"), img["height"], img["width"])
        bbox = ann.get("bbox")
        if problem is None and bbox is not None and (not isinstance(bbox, list) or len(bbox) != 4
                                                     or not all(is_number(v) for v in bbox)):
            problem = f"bbox {bbox!r} is not [x, y, w, h]"
        if problem:
            index.bad_anns[ann_id] = f"annotation {ann_id}: {problem}"
            del index.anns[ann_id]
    return index


def refs_to_items(refs: Iterable[dict[str, Any]], index: CocoIndex, *, dataset: str, images_root: str,
                  splits: frozenset[str] | None, skips: SkipReport) -> list[ImageItem]:
    """Normalised refs -> one ImageItem per (split, image), every valid sentence one expression."""
    items: dict[tuple[str, int], ImageItem] = {}
    uris: dict[int, str | ValueError] = {}
    seen_ids: set[str] = set()
    for ref in refs:
        split, image_id = ref["split"], ref["image_id"]
        if splits is not None and split not in splits:
            continue
        where = f"ref {ref['ref_id']} (image {image_id})"
        sentences = ref["sentences"]
        if not sentences:
            skips.add("ref without sentences", where)
            continue
        img = index.images.get(image_id)
        if img is None:
            reason = "corrupt image entry" if image_id in index.bad_images else "unknown image"
            skips.add(reason, where, index.bad_images.get(image_id, f"no image {image_id} in instances.json"),
                      expressions=len(sentences))
            continue
        problem = None
        for ann_id in ref["ann_ids"]:
            ann = index.anns.get(ann_id)
            if ann_id in index.bad_anns:
                problem = ("corrupt annotation", index.bad_anns[ann_id])
            elif ann is None:
                problem = ("unknown annotation", f"no annotation {ann_id} in instances.json")
            elif ann["image_id"] != image_id:
                problem = ("annotation of another image",
                           f"annotation {ann_id} is on image {ann['image_id']}")
            if problem:
                break
        if image_id not in uris:
            try:
                uris[image_id] = resolve_within(images_root, img["file_name"])
            except ValueError as exc:
                uris[image_id] = exc
        if problem:
            skips.add(problem[0], where, problem[1], expressions=len(sentences))
            continue
        item = items.get((split, image_id))
        if item is None:
            uri = uris[image_id]
            item = items[(split, image_id)] = {
                "image_id": str(image_id), "image_uri": None if isinstance(uri, ValueError) else uri,
                "width": int(img["width"]), "height": int(img["height"]), "split": split, "dataset": dataset,
                "annotations": {}, "expressions": []}
            if isinstance(uri, ValueError):  # kept with its reason, never read
                flag(item, ESCAPES_ROOT, str(uri))
        for ann_id in ref["ann_ids"]:
            ann = index.anns[ann_id]
            item["annotations"][str(ann_id)] = {"segmentation": ann["segmentation"], "bbox": ann.get("bbox")}
        for sent in sentences:
            sent_id = sent.get("sent_id") if isinstance(sent, dict) else None
            text = (sent.get("sent") or sent.get("raw") or "").strip() if isinstance(sent, dict) else ""
            if sent_id is None:
                skips.add("corrupt sentence", where, f"sentence without sent_id: {sent!r}", expressions=1)
            elif not text:
                skips.add("empty sentence", f"sentence {sent_id} of {where}", expressions=1)
            elif str(sent_id) in seen_ids:
                skips.add("duplicate expression id", f"sentence {sent_id} of {where}", expressions=1)
            else:
                seen_ids.add(str(sent_id))
                item["expressions"].append({"expression_id": str(sent_id), "text": text,
                                            "no_target": not ref["ann_ids"], "ann_ids": list(ref["ann_ids"])})
    ordered = sorted(items.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    return [item for _, item in ordered if item["expressions"]]


def normalise_ref(ref: Any, ann_ids: list[int], skips: SkipReport, pos: int) -> dict[str, Any] | None:
    """A ref with its targets already normalised -> the common form, or None (skipped) when malformed."""
    missing = [k for k in ("ref_id", "image_id", "split") if k not in ref]
    if missing or not is_int(ref.get("image_id")):
        skips.add("corrupt ref", f"refs[{pos}] (ref {ref.get('ref_id')})",
                  f"missing or invalid {', '.join(missing) or 'image_id'}")
        return None
    sentences = ref.get("sentences") or []
    if not isinstance(sentences, list):
        skips.add("corrupt ref", f"ref {ref['ref_id']}", "sentences is not a list")
        return None
    return {"ref_id": ref["ref_id"], "image_id": ref["image_id"], "split": str(ref["split"]),
            "ann_ids": ann_ids, "sentences": sentences}
