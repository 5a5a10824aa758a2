"""Binary masks as COCO compressed RLE: the one mask representation stored anywhere in the pipeline.

An RLE here is a plain dict ``{"size": [h, w], "counts": str}`` (counts as a UTF-8 string, as COCO's
JSON files hold it), so it round-trips through JSON and Parquet structs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils

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



#: pycocotools stores counts as uint32; a run needs at most 7 characters of 5 bits (35 bits with the sign).
_MAX_RUN = 2**32 - 1
_MAX_CHARS_PER_RUN = 7
#: Characters validated at once (~50 bytes of numpy arrays each): bounds the memory of a block of masks.
_CHUNK_CHARS = 2**21


def rle_problems(counts: Sequence[bytes | str | None], height: np.ndarray, width: np.ndarray) -> list[str | None]:
    """Why each compressed RLE is unusable, or None where it is valid; a null `counts` is None (no mask).

    Validated in numpy before pycocotools ever sees the string, because pycocotools' parser trusts it: a
    string ending mid-number is read past its end, and counts that do not add up to h*w make decode write
    past the mask (a hang or a crash, not an error). The string is COCO's LEB128-like form: per run, 5-bit
    groups (character - 48), bit 0x20 = "more groups follow", bit 0x10 of the last group = negative; runs
    from the fourth on are deltas to the run two before. Valid: characters in '0'..'o', no run cut off at the
    end, at most 7 groups per run, every decoded run in [0, 2**32), and the runs adding up to h*w >= 0.
    """
    height, width = np.asarray(height, np.int64), np.asarray(width, np.int64)
    data = [c.encode("utf-8", "surrogatepass") if isinstance(c, str) else c for c in counts]
    lengths = np.fromiter((-1 if c is None else len(c) for c in data), np.int64, len(data))
    negative = (lengths >= 0) & ((height < 0) | (width < 0))
    area = height * width
    out: list[str | None] = [None] * len(data)
    for i in np.flatnonzero(negative):
        out[i] = f"negative size {[int(height[i]), int(width[i])]}"
    for i in np.flatnonzero((lengths == 0) & ~negative & (area != 0)):
        out[i] = f"counts add up to 0 pixels, not h*w = {int(area[i])}"
    rows = np.flatnonzero((lengths > 0) & ~negative)
    # Bounded memory: at most about _CHUNK_CHARS characters are validated at a time.
    chunk_of = np.cumsum(lengths[rows]) // _CHUNK_CHARS
    edges = np.searchsorted(chunk_of, np.unique(chunk_of)).tolist() + [len(rows)]
    for a, b in zip(edges, edges[1:]):
        part = rows[a:b]
        for i, problem in zip(part.tolist(), _run_problems([data[i] for i in part], area[part])):
            if problem is not None:
                out[i] = problem
    return out


def _run_problems(strings: list[bytes], area: np.ndarray) -> list[str | None]:
    """`rle_problems` of non-empty counts strings, vectorised over all their characters (uint8 where possible:
    most runs are one character, so per-character work is a few byte-wide passes)."""
    n = len(strings)
    lengths = np.fromiter(map(len, strings), np.int64, n)
    raw = np.frombuffer(b"".join(strings), np.uint8)
    ends = np.cumsum(lengths)
    starts = ends - lengths

    def per_string(flags: np.ndarray, first: np.ndarray, stop: np.ndarray) -> np.ndarray:
        """How many flags are set in each [first, stop) slice (a prefix-sum difference, no Python loop)."""
        prefix = np.zeros(len(flags) + 1, np.int64)
        np.cumsum(flags, out=prefix[1:])
        return prefix[stop] - prefix[first]

    bad_char = per_string((raw < 48) | (raw > 111), starts, ends) > 0
    more = raw >= 80  # (character - 48) & 0x20 for characters in the alphabet
    cut = more[ends - 1]  # the last character says "more groups follow"
    last = ~more
    last[ends - 1] = True  # runs never span two strings (a run cut off there is already marked)
    runs_per = per_string(last, starts, ends)
    first_run = np.cumsum(runs_per) - runs_per
    run_end = np.flatnonzero(last)
    run_owner = np.repeat(np.arange(n), runs_per)
    run_len = np.diff(np.r_[-1, run_end])  # runs tile the characters, string after string
    tail = (raw[run_end].astype(np.int64) - 48) & 0x3F  # each run's last group
    value = (tail & 0x1F) << np.minimum(5 * (run_len - 1), 40)
    continued = np.flatnonzero(~last)  # the rare earlier groups of multi-character runs
    if len(continued):
        run = np.searchsorted(run_end, continued)
        shift = np.minimum(5 * (continued - (run_end[run] - run_len[run] + 1)), 40)
        value += np.bincount(run, weights=((raw[continued].astype(np.int64) - 48) & 0x1F) << shift,
                             minlength=len(run_end)).astype(np.int64)
    value -= np.where(tail & 0x10, np.int64(1) << np.minimum(5 * run_len, 40), 0)  # negative runs
    # Deltas: run k >= 3 of a string adds run k-2, so each parity chain (k = 1, 3, 5... and k = 2, 4, ...) is
    # a running sum within its string (a global running sum minus its value where the string starts).
    k = np.arange(len(run_end)) - first_run[run_owner]
    decoded = value.copy()
    for parity in (1, 0):
        chain = (k > 0) & ((k & 1) == parity)
        running = np.cumsum(np.where(chain, value, 0))
        decoded[chain] = (running - running[first_run][run_owner])[chain]
    bad_run = per_string((run_len > _MAX_CHARS_PER_RUN) | (decoded < 0) | (decoded > _MAX_RUN),
                         first_run, first_run + runs_per) > 0
    total = np.add.reduceat(np.clip(decoded, 0, _MAX_RUN), first_run)
    wrong_sum = total != area
    out: list[str | None] = [None] * n
    for j in np.flatnonzero(bad_char | cut | bad_run | wrong_sum):
        out[j] = ("counts hold characters outside COCO's RLE alphabet" if bad_char[j]
                  else "counts end in the middle of a run" if cut[j]
                  else "counts hold a run outside [0, 2**32)" if bad_run[j]
                  else f"counts add up to {int(total[j])} pixels, not h*w = {int(area[j])}")
    return out


def rle_problem(rle: RLE | None) -> str | None:
    """`rle_problems` for one RLE dict (None: no mask, no problem); a size that is not [h, w] is a problem."""
    if rle is None or rle.get("counts") is None:
        return None
    size = rle.get("size")
    if size is None or len(size) != 2:
        return f"size {size!r} is not [height, width]"
    return rle_problems([rle["counts"]], np.array([size[0]]), np.array([size[1]]))[0]
