"""Binary masks as COCO compressed RLE: the one mask representation stored anywhere in the pipeline.

An RLE here is a plain dict ``{"size": [h, w], "counts": str}`` (counts as a UTF-8 string, as COCO's
JSON files hold it), so it round-trips through JSON and Parquet structs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.rle_counts import check_counts

RLE = dict  # {"size": [h, w], "counts": str}


def _to_coco(rle: RLE) -> dict:
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.encode("utf-8") if isinstance(counts, str) else counts}


def _from_coco(rle: dict) -> RLE:
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("utf-8") if isinstance(counts, bytes) else counts}


def encode(mask: np.ndarray) -> RLE:
    """(H, W) bool/uint8 array -> compressed RLE."""
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    return _from_coco(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))


def decode(rle: RLE) -> np.ndarray:
    """Compressed RLE -> (H, W) bool array; ValueError naming the problem for an invalid RLE (`rle_problem`),
    which pycocotools would read past its end."""
    problem = rle_problem(rle)
    if problem is not None:
        raise ValueError(f"invalid RLE mask: {problem}")
    return mask_utils.decode(_to_coco(rle)).astype(bool)


def empty(height: int, width: int) -> RLE:
    return encode(np.zeros((height, width), dtype=np.uint8))


def area(rle: RLE) -> int:
    return int(mask_utils.area(_to_coco(rle)))


def to_bbox(rle: RLE) -> list[float]:
    """Tight box [x, y, w, h] of the mask (all zeros when empty), as pycocotools' toBbox."""
    return [float(v) for v in mask_utils.toBbox(_to_coco(rle))]


def union(rles: Sequence[RLE], height: int, width: int) -> RLE:
    """Union of masks (clipped to 1); the empty mask for no input."""
    if not rles:
        return empty(height, width)
    return _from_coco(mask_utils.merge([_to_coco(r) for r in rles], intersect=False))


def from_polygons(polygons: Iterable[Sequence[float]], height: int, width: int) -> RLE:
    """COCO polygon list (flat x0, y0, x1, y1, ...) -> one merged RLE, rasterised by pycocotools."""
    polys = [list(map(float, p)) for p in polygons if len(p) >= 6]
    if not polys:
        return empty(height, width)
    return _from_coco(mask_utils.merge(mask_utils.frPyObjects(polys, height, width)))


def from_segmentation(segmentation, height: int, width: int) -> RLE:
    """Any COCO `segmentation` (polygons, uncompressed RLE with list counts, compressed RLE) -> RLE."""
    if isinstance(segmentation, list):
        return from_polygons(segmentation, height, width)
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return _from_coco(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation:
        rle = _from_coco(_to_coco(segmentation))
        problem = rle_problem(rle)
        if problem is not None:  # a source file's RLE is validated before pycocotools merges it
            raise ValueError(f"invalid compressed RLE: {problem}")
        return rle
    raise ValueError(f"unrecognised COCO segmentation of type {type(segmentation).__name__}")


def intersection_union(pred: Sequence[RLE], gt: Sequence[RLE]) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair pixel intersection and union of two equal-length lists of RLEs, computed on the RLEs.

    Uses merge(intersect=True) and area; no mask is decoded to a dense array.
    """
    if len(pred) != len(gt):
        raise ValueError(f"{len(pred)} predictions vs {len(gt)} ground-truth masks")
    inter = np.empty(len(pred), dtype=np.int64)
    uni = np.empty(len(pred), dtype=np.int64)
    for i, (p, g) in enumerate(zip(pred, gt)):
        pc, gc = _to_coco(p), _to_coco(g)
        if pc["size"] != gc["size"]:
            raise ValueError(f"mask size {pc['size']} differs from ground truth {gc['size']}")
        a_p, a_g = int(mask_utils.area(pc)), int(mask_utils.area(gc))
        inter[i] = 0 if a_p == 0 or a_g == 0 else int(mask_utils.area(mask_utils.merge([pc, gc], intersect=True)))
        uni[i] = a_p + a_g - inter[i]
    return inter, uni


def rle_problems(counts, height: np.ndarray, width: np.ndarray) -> list[str | None]:
    """Why each compressed RLE is unusable, or None where it is valid (or its counts null: no mask); `counts`
    a sequence of bytes/str/None or an Arrow binary/string array. Validated in numpy before pycocotools ever
    sees the string, which it would read past its end (`pipeline.rle_counts`)."""
    return check_counts(counts, height, width).problems


def rle_problem(rle: RLE | None) -> str | None:
    """`rle_problems` for one RLE dict (None: no mask, no problem); a size that is not [h, w] is a problem."""
    if rle is None or rle.get("counts") is None:
        return None
    size = rle.get("size")
    if size is None or len(size) != 2:
        return f"size {size!r} is not [height, width]"
    return rle_problems([rle["counts"]], np.array([size[0]]), np.array([size[1]]))[0]
