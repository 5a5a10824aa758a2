"""Masks of one block as pycocotools reads them, and the few batch operations scoring needs on them.

Built straight from the Arrow RLE struct column (counts as bytes, sizes as numpy): no Python dict per row
until pycocotools is called, and no mask is ever decoded to a dense array. Every RLE is parsed once, here, on
read (`pipeline.rle_counts.check_counts`), which validates it and measures its area in the same pass: an
unusable one (size not [h, w] or negative, counts that are not valid COCO RLE or do not add up to h*w)
becomes "no mask" and is marked in `invalid`, so pycocotools never sees it (it would loop or write past the
mask). `intersections` computes the same numbers as `pipeline.masks.intersection_union` (pycocotools merge +
area), without its per-call conversions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pycocotools import mask as mask_utils

from pipeline.masks import RLE
from pipeline.rle_counts import check_counts
from pipeline.schemas import RLE_TYPE

BOXES_TYPE = pa.list_(pa.list_(pa.float64()))  # gt_boxes: per target [x, y, w, h]


@dataclass
class Masks:
    """N COCO RLE masks in the form pycocotools reads (counts as bytes); counts None = no mask."""

    counts: list[bytes | None]
    height: np.ndarray  # (N,) int64, 0 where no mask
    width: np.ndarray
    area: np.ndarray  # (N,) int64 pixels set (pycocotools' area), 0 where no mask
    invalid: np.ndarray | None = None  # (N,) bool: a mask was given but is unusable (now counts None)

    def __len__(self) -> int:
        return len(self.counts)

    @classmethod
    def from_arrow(cls, column: pa.Array | pa.ChunkedArray,
                   same_as: tuple[pa.Array | pa.ChunkedArray, Masks] | None = None) -> Masks:
        """From an RLE_TYPE struct column, without building a Python object per size list; unusable RLEs
        (see the module docstring) are dropped to "no mask" and marked in `invalid`. `same_as`: another RLE
        column of the same rows and its Masks; a row whose RLE equals that column's usable one (same counts,
        same size) takes its verdict, area and counts object without a second parse (a teacher-forced mask
        mostly is the output mask)."""
        counts = pc.struct_field(column, "counts")
        valid = pc.and_(pc.is_valid(column), pc.is_valid(counts)).to_numpy(zero_copy_only=False)
        size = pc.struct_field(column, "size")
        lengths = pc.fill_null(pc.list_value_length(size), 0).to_numpy(zero_copy_only=False)
        sizes_ok = (lengths == 2) & pc.is_valid(size).to_numpy(zero_copy_only=False)
        has_size = valid & sizes_ok
        hw = np.zeros((len(valid), 2), np.int64)
        if has_size.any():
            flat = pc.list_flatten(pc.filter(size, pa.array(has_size)))
            hw[has_size] = pc.fill_null(flat, -1).to_numpy(zero_copy_only=False).reshape(-1, 2)
        binary = counts.cast(pa.binary())
        reused = np.zeros(len(valid), bool)
        if same_as is not None:
            other_column, other = same_as
            other_counts = pc.struct_field(other_column, "counts").cast(pa.binary())
            same = pc.fill_null(pc.equal(binary, other_counts), False).to_numpy(zero_copy_only=False)
            reused = (same & has_size & other.usable() & (hw[:, 0] == other.height)
                      & (hw[:, 1] == other.width))
        parsed = np.flatnonzero(~reused)
        todo = binary.take(pa.array(parsed, pa.int64())) if reused.any() else binary
        check = check_counts(todo, hw[parsed, 0], hw[parsed, 1])  # from the Arrow buffers: no per-mask objects
        usable, area = reused.copy(), np.zeros(len(valid), np.int64)
        usable[parsed] = has_size[parsed] & np.array([p is None for p in check.problems], dtype=bool)
        area[parsed] = np.where(usable[parsed], check.area, 0)
        data: list[bytes | None] = [None] * len(valid)
        for k, d, ok in zip(parsed.tolist(), todo.to_pylist(), usable[parsed].tolist()):
            data[k] = d if ok else None
        if same_as is not None:
            for k in np.flatnonzero(reused).tolist():
                data[k] = same_as[1].counts[k]
            area[reused] = same_as[1].area[reused]
        hw[~usable] = 0
        return cls(data, hw[:, 0], hw[:, 1], area, valid & ~usable)

    @classmethod
    def from_rles(cls, rles: Sequence[RLE | None]) -> Masks:
        return cls.from_arrow(pa.array(list(rles), type=RLE_TYPE))

    def __post_init__(self) -> None:
        if self.invalid is None:
            self.invalid = np.zeros(len(self.counts), bool)

    def take(self, rows: np.ndarray) -> Masks:
        """The masks at `rows` (already validated: no second check)."""
        rows = np.asarray(rows, np.int64)
        return Masks([self.counts[k] for k in rows], self.height[rows], self.width[rows], self.area[rows],
                     self.invalid[rows])

    def drop(self, rows: np.ndarray) -> None:
        """Make the masks at `rows` "no mask" (in place)."""
        for k in rows:
            self.counts[k] = None
        self.area[rows] = 0

    def usable(self) -> np.ndarray:
        """(N,) bool: a valid mask is present."""
        return np.array([c is not None for c in self.counts], dtype=bool)

    @cached_property
    def sizes(self) -> list[tuple[int, int]]:
        """(h, w) per mask as plain ints, as pycocotools takes them (built once, when first needed)."""
        return list(zip(self.height.tolist(), self.width.tolist()))

    def coco(self, i: int) -> dict:
        return {"size": self.sizes[i], "counts": self.counts[i]}

    def areas(self, rows: np.ndarray) -> np.ndarray:
        """Areas of the masks at `rows` (measured on read, as pycocotools' `area` counts them)."""
        return self.area[np.asarray(rows, np.int64)]

    def bboxes(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), 4) tight boxes [x, y, w, h] (pycocotools toBbox, one call)."""
        if not len(rows):
            return np.zeros((0, 4))
        return np.asarray(mask_utils.toBbox([self.coco(k) for k in rows]), np.float64).reshape(-1, 4)


def intersections(a: Masks, b: Masks, rows: np.ndarray, a_area: np.ndarray, b_area: np.ndarray) -> np.ndarray:
    """|a_k ∩ b_k| for k in rows, on the RLEs (pycocotools merge + area, as `pipeline.masks.intersection_union`);
    a_area / b_area are the masks' areas at those rows (an empty side skips the merge)."""
    out = np.zeros(len(rows), np.int64)
    both = np.flatnonzero((np.asarray(a_area) != 0) & (np.asarray(b_area) != 0))
    merge, area, sizes, ac, bc = mask_utils.merge, mask_utils.area, a.sizes, a.counts, b.counts
    out[both] = [area(merge([{"size": sizes[k], "counts": ac[k]}, {"size": sizes[k], "counts": bc[k]}],
                            intersect=True)) for k in np.asarray(rows, np.int64)[both].tolist()]
    return out


def enclosing_boxes(gt_boxes: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N, 4) ground-truth box per expression: the box enclosing all its targets' [x, y, w, h] boxes, i.e. the
    tight box of the union of the targets (when each target box is tight); NaN where it has no box."""
    if isinstance(gt_boxes, pa.ChunkedArray):
        gt_boxes = gt_boxes.combine_chunks() if gt_boxes.num_chunks else pa.array([], BOXES_TYPE)
    gt_boxes = gt_boxes.cast(BOXES_TYPE)
    out = np.full((len(gt_boxes), 4), np.nan)
    inner = pc.list_flatten(gt_boxes)
    parent = pc.list_parent_indices(gt_boxes).to_numpy(zero_copy_only=False)
    good = (pc.fill_null(pc.list_value_length(inner), 0).to_numpy(zero_copy_only=False) == 4)
    if not good.any():
        return out
    xywh = pc.list_flatten(pc.filter(inner, pa.array(good))).to_numpy(zero_copy_only=False).reshape(-1, 4)
    parent = parent[good]
    first = np.flatnonzero(np.r_[True, parent[1:] != parent[:-1]])
    rows = parent[first]
    x1, y1 = np.minimum.reduceat(xywh[:, 0], first), np.minimum.reduceat(xywh[:, 1], first)
    x2 = np.maximum.reduceat(xywh[:, 0] + xywh[:, 2], first)
    y2 = np.maximum.reduceat(xywh[:, 1] + xywh[:, 3], first)
    out[rows] = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)
    return out
